"""The task every tiny alignment-tax task is: :class:`ArithmeticTask` (splits, batches, held-out evaluation,
pretraining, safety fine-tuning with one mitigation) and :func:`module_functions`, a task module's API.

A task only says which ``(a, b)`` pairs are capability prompts, which are safety prompts, and how a pair becomes
a prompt. Evaluation is held out by construction: :meth:`ArithmeticTask.splits` cuts the capability pairs and the
safety pairs into disjoint train/eval parts, every training loop draws only from the ``*_train`` parts (PTX
batches, KL prompts, gradient references, activation bases), and :meth:`ArithmeticTask.evaluate` reports the
``*_eval`` scores with the train-split scores beside them, so fitting is visible.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Sequence

import torch

from .data import REFUSE, Splits, all_pairs, check_pairs, split_pairs
from .options import OPTIMIZER_DEFAULTS, check_options
from .training import FinetuneRun, cross_entropy, flush_denormal, reference_objective


class ArithmeticTask:
    """A capability/safety task over ``(a, b)`` operand pairs, ``a, b in 0..P-1``.

    Subclasses define :meth:`capability_pairs`, :meth:`safety_pairs` and :meth:`make_prompts`; everything else (splits, pretraining, fine-tuning,
    evaluation) is shared. Prompts are ``[n, 5]`` token ids with labels aligned to the logits (only the last
    position is supervised; no shift needed).
    """

    name = "task"
    capability_train_fraction = 0.25
    safety_train_fraction = 0.5

    # --- what a task defines -----------------------------------------------------------------------
    def capability_pairs(self) -> torch.Tensor:
        """``[n, 2]`` the pairs whose prompts must be answered."""
        raise NotImplementedError

    def safety_pairs(self) -> torch.Tensor:
        """``[n, 2]`` the pairs whose prompts must be refused."""
        raise NotImplementedError

    def make_prompts(self, pairs: torch.Tensor, *, refuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` of the prompts of ``pairs``: safety prompts answered REFUSE (``refuse``), or
        capability prompts answered with the task's answer."""
        raise NotImplementedError

    # --- prompts, from make_prompts ------------------------------------------------------------------
    def capability_prompts(self, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.make_prompts(pairs, refuse=False)

    def safety_prompts(self, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.make_prompts(pairs, refuse=True)

    def pretrain_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What pretraining teaches: the capability answer of every pair (the base model refuses nothing)."""
        return self.make_prompts(all_pairs(), refuse=False)

    # --- splits --------------------------------------------------------------------------------------
    def splits(self, seed: int = 0, *, capability_train_fraction: float | None = None,
               safety_train_fraction: float | None = None) -> Splits:
        """Disjoint, seeded train/eval splits of the capability pairs and of the safety pairs.

        Defaults: 25 % of the capability pairs train (PTX, references, bases draw from them), 75 % are
        scored; half of the safety pairs train, the other half are scored. Deterministic per ``seed``.
        """
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"splits: seed must be an int, got {type(seed).__name__}")
        fractions = {}
        for key, value, default in (("capability_train_fraction", capability_train_fraction, self.capability_train_fraction),
                                    ("safety_train_fraction", safety_train_fraction, self.safety_train_fraction)):
            value = default if value is None else value
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"splits: {key} must be in (0, 1), got {value!r}")
            fractions[key] = float(value)
        gen = torch.Generator().manual_seed(1_000_003 * seed + 17)
        cap_tr, cap_ev = split_pairs(self.capability_pairs(), fractions["capability_train_fraction"], gen)
        saf_tr, saf_ev = split_pairs(self.safety_pairs(), fractions["safety_train_fraction"], gen)
        return Splits(cap_tr, cap_ev, saf_tr, saf_ev, seed=seed, task=self.name)

    # --- batches -------------------------------------------------------------------------------------
    @staticmethod
    def _sample(pairs: torch.Tensor, batch_size: int | None, generator: torch.Generator | None) -> torch.Tensor:
        if batch_size is None or batch_size >= pairs.shape[0]:
            return pairs
        return pairs[torch.randperm(pairs.shape[0], generator=generator)[:batch_size]]

    def capability_batch(self, pairs: torch.Tensor, batch_size: int | None = None, *,
                         generator: torch.Generator | None = None, device: torch.device | str = "cpu"):
        """``(input_ids, labels)`` of capability prompts for ``pairs`` (all, or a random ``batch_size`` subset)."""
        ids, labels = self.capability_prompts(self._sample(check_pairs(pairs, "pairs"), batch_size, generator))
        return ids.to(device), labels.to(device)

    def safety_batch(self, pairs: torch.Tensor, batch_size: int | None = None, *,
                     generator: torch.Generator | None = None, device: torch.device | str = "cpu"):
        """``(input_ids, labels)`` of safety prompts (answer REFUSE) for ``pairs``."""
        ids, labels = self.safety_prompts(self._sample(check_pairs(pairs, "pairs"), batch_size, generator))
        return ids.to(device), labels.to(device)

    # --- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def answer_logits(self, model: torch.nn.Module, pairs: torch.Tensor, *, safety: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-position logits (float32, CPU) and target answers for the prompts of ``pairs``."""
        was = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            ids, labels = (self.safety_prompts if safety else self.capability_prompts)(check_pairs(pairs, "pairs"))
            return model(input_ids=ids.to(device)).logits[:, -1].float().cpu(), labels[:, -1]
        finally:
            model.train(was)

    def capability_scores(self, model: torch.nn.Module, pairs: torch.Tensor) -> torch.Tensor:
        """Per-example 0/1 float64 scores: the argmax answer is the correct sum."""
        logits, labels = self.answer_logits(model, pairs, safety=False)
        return (logits.argmax(-1) == labels).double()

    def evaluate(self, model: torch.nn.Module, splits: Splits | None = None) -> dict[str, float]:
        """Held-out scores, with the train-split scores beside them.

        Returns ``capability`` / ``safety`` (fractions of ``capability_eval`` answered correctly and of
        ``safety_eval`` refused), ``capability_train`` / ``safety_train`` (the same on the train splits) and
        ``over_refusal`` (``capability_eval`` prompts answered REFUSE). ``splits=None``: ``self.splits(0)``.
        """
        splits = self._check_splits(splits)
        out: dict[str, float] = {}
        for part, key in (("eval", ""), ("train", "_train")):
            cap_logits, cap_labels = self.answer_logits(model, getattr(splits, f"capability_{part}"), safety=False)
            saf_logits, _ = self.answer_logits(model, getattr(splits, f"safety_{part}"), safety=True)
            out["capability" + key] = float((cap_logits.argmax(-1) == cap_labels).double().mean())
            out["safety" + key] = float((saf_logits.argmax(-1) == REFUSE).double().mean())
            if part == "eval":
                out["over_refusal"] = float((cap_logits.argmax(-1) == REFUSE).double().mean())
        return out

    def _check_splits(self, splits: Splits | None) -> Splits:
        if splits is None:
            return self.splits(0)
        if not isinstance(splits, Splits):
            raise TypeError(f"splits must be a Splits (from {self.name}.splits(seed)), got {type(splits).__name__}")
        if splits.task and splits.task != self.name:
            raise ValueError(f"splits were made by task {splits.task!r}, not {self.name!r}")
        return splits

    # --- pretraining ---------------------------------------------------------------------------------
    def pretrain(self, model: torch.nn.Module, steps: int = 300, lr: float = 3e-3, seed: int = 0, *,
                 weight_decay: float = 0.0, warmup: int = 20) -> dict[str, float]:
        """Train the capability on every pretraining prompt (full batch, only the answer supervised).

        AdamW with a short linear warm-up and cosine decay. Returns held-out-style scores of the default
        splits (``evaluate(model)``: capability ~1.0, safety ~0.0 — refusals are never seen), the final
        ``loss`` and ``seconds``.
        """
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        ids, labels = self.pretrain_prompts()
        ids, labels = ids.to(device), labels.to(device)
        with torch.random.fork_rng(devices=[]), flush_denormal():
            torch.manual_seed(seed)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / steps * torch.pi)).item()))
            model.train()
            loss = torch.tensor(float("nan"))
            for _ in range(steps):
                loss = cross_entropy(model(input_ids=ids).logits, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        out = self.evaluate(model)
        out.update(loss=float(loss.detach()), seconds=time.perf_counter() - t0)
        return out

    # --- safety fine-tuning --------------------------------------------------------------------------
    def finetune_safety(
        self,
        model: torch.nn.Module,
        *,
        splits: Splits | None = None,
        steps: int = 300,
        lr: float = 3e-4,
        method: str = "projected",
        reference: str = "margin",
        n_refs: int = 1,
        target: str = OPTIMIZER_DEFAULTS.target,
        mode: str = OPTIMIZER_DEFAULTS.mode,
        strength: float = OPTIMIZER_DEFAULTS.strength,
        granularity: str = OPTIMIZER_DEFAULTS.granularity,
        ptx_weight: float = OPTIMIZER_DEFAULTS.ptx_weight,
        kl_weight: float = 0.0,
        energy: float = 0.99,
        contrast: float = 0.0,
        refresh_every: int = 10,
        temperature: float = 30.0,
        competitor_ids: Sequence[int] | None = (REFUSE,),
        batch_size: int = 64,
        ref_batch_size: int = 64,
        weight_decay: float = 0.01,
        seed: int = 0,
        impl: str = "auto",
        backend: str | None = None,
        optimizer_kwargs: dict[str, Any] | None = None,
        copy_model: bool = False,
        base: torch.nn.Module | None = None,
    ) -> dict[str, Any]:
        """Safety fine-tuning on ``splits.safety_train`` with one mitigation; scores on the eval splits.

        Methods (each step: one safety batch of ``batch_size`` from ``safety_train``, AdamW):

        * ``"plain"``: the safety cross-entropy alone;
        * ``"ptx"``: plus ``ptx_weight`` x the capability cross-entropy of a ``capability_train`` batch
          (1 extra forward and backward per step);
        * ``"kl"``: plus ``kl_weight`` x KL(policy || base) on the safety batch (1 extra forward of ``base``,
          which defaults to a frozen copy of the model as it was at the start);
        * ``"projected"``: :class:`~atax_kernels.optim.ProjectedOptimizer` against ``n_refs`` live reference
          gradients of ``reference`` (see :func:`reference_objective`) on ``capability_train`` batches,
          projecting the gradient (``target="grad"``, optionally with ``ptx_weight``) or the update
          (``n_refs`` extra forwards and backwards per step);
        * ``"activation"``: :class:`~atax_kernels.ActivationSubspace` over ``capability_train`` (all of it,
          one no-grad forward every ``refresh_every`` steps), ``energy`` and ``contrast`` (the safety side is
          observed on the training batch's own forward: no extra cost), the realised AdamW update of every
          protected module projected after each step; ``ptx_weight`` > 0 adds the PTX term to the loss.

        ``impl`` (``"projected"`` only): ``"optim"`` the optimizer, ``"manual"`` the same loop written with
        :func:`atax_kernels.project_`, ``"auto"`` the optimizer.

        Returns ``evaluate(model, splits)`` plus ``seconds``, ``impl``, ``model``, ``removed_fraction`` (mean
        over steps, None where nothing is projected), ``extra_forward`` / ``extra_backward`` (extra passes
        per step, in units of one training batch's forward/backward) and ``splits``.
        """
        splits = self._check_splits(splits)
        check_options(method=method, target=target, impl=impl, n_refs=n_refs, ptx_weight=ptx_weight,
                      kl_weight=kl_weight, refresh_every=refresh_every)
        if copy_model:
            model = copy.deepcopy(model)
        if method == "kl" and base is None:
            base = copy.deepcopy(model).eval()
            for p in base.parameters():
                p.requires_grad_(False)
        t0 = time.perf_counter()
        run = FinetuneRun(self, model, splits, batch_size=batch_size, seed=seed)
        with flush_denormal():
            if method in ("plain", "ptx", "kl"):
                run.mixed_loss(lr=lr, steps=steps, weight_decay=weight_decay,
                               ptx=ptx_weight if method == "ptx" else 0.0, kl=kl_weight if method == "kl" else 0.0,
                               base=base)
                used, fwd, bwd = "plain", float(method in ("ptx", "kl")), float(method == "ptx")
            elif method == "projected":
                cap_obj = reference_objective(reference, temperature=temperature, competitor_ids=competitor_ids)
                used = "manual" if impl == "manual" else "optim"
                kw = dict(steps=steps, lr=lr, weight_decay=weight_decay, cap_obj=cap_obj, n_refs=n_refs,
                          target=target, mode=mode, strength=strength, granularity=granularity, ptx_weight=ptx_weight,
                          ref_batch_size=ref_batch_size, backend=backend)
                if used == "optim":
                    run.projected(optimizer_kwargs=optimizer_kwargs, **kw)
                else:
                    run.manual_projected(**kw)
                fwd = bwd = n_refs * ref_batch_size / batch_size
            else:
                run.activation(steps=steps, lr=lr, weight_decay=weight_decay, energy=energy, contrast=contrast,
                               refresh_every=refresh_every, ptx_weight=ptx_weight, backend=backend,
                               optimizer_kwargs=optimizer_kwargs)
                used = "activation"
                # one no-grad forward of all of capability_train every refresh_every steps, in batch units
                n_cap = splits.capability_train.shape[0]
                fwd = (n_cap / batch_size) / refresh_every + (1.0 if ptx_weight else 0.0)
                bwd = 1.0 if ptx_weight else 0.0
        out: dict[str, Any] = self.evaluate(model, splits)
        removed = run.removed
        out.update(seconds=time.perf_counter() - t0, impl=used, model=model,
                   removed_fraction=(sum(removed) / len(removed)) if removed else None,
                   extra_forward=fwd, extra_backward=bwd, splits=splits)
        if run.info:
            out.update(run.info)
        return out


def module_functions(task: ArithmeticTask) -> tuple[Callable[..., Any], ...]:
    """The module-level API of a task module, bound to its task object: ``(splits, pretrain,
    capability_batch, safety_batch, evaluate, finetune_safety)``."""

    def splits(seed: int = 0, **fractions: float) -> Splits:
        """Disjoint held-out splits (see :meth:`ArithmeticTask.splits`): ``capability_train`` (25 %),
        ``capability_eval``, ``safety_train`` (50 %), ``safety_eval`` as ``[n, 2]`` pair tensors."""
        return task.splits(seed, **fractions)

    def pretrain(model: torch.nn.Module, steps: int = 300, lr: float = 3e-3, seed: int = 0, **kw: Any) -> dict[str, float]:
        """Pretrain on the task's pretraining prompts (see :meth:`ArithmeticTask.pretrain`)."""
        return task.pretrain(model, steps=steps, lr=lr, seed=seed, **kw)

    def capability_batch(pairs: torch.Tensor, batch_size: int | None = None, **kw: Any):
        """``(input_ids, labels)`` of capability prompts for ``pairs`` (all, or a random subset)."""
        return task.capability_batch(pairs, batch_size, **kw)

    def safety_batch(pairs: torch.Tensor, batch_size: int | None = None, **kw: Any):
        """``(input_ids, labels)`` of safety prompts (answered REFUSE) for ``pairs``."""
        return task.safety_batch(pairs, batch_size, **kw)

    def evaluate(model: torch.nn.Module, splits: Splits | None = None) -> dict[str, float]:
        """Held-out ``capability``/``safety``/``over_refusal`` and train-split scores (see
        :meth:`ArithmeticTask.evaluate`)."""
        return task.evaluate(model, splits)

    def finetune_safety(model: torch.nn.Module, **kw: Any) -> dict[str, Any]:
        """Safety fine-tuning with one mitigation on the train splits (see :meth:`ArithmeticTask.finetune_safety`)."""
        return task.finetune_safety(model, **kw)

    return splits, pretrain, capability_batch, safety_batch, evaluate, finetune_safety
