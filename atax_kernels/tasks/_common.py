"""What every tiny alignment-tax task shares: the vocabulary, the model, splits, pretraining, fine-tuning
loops and held-out evaluation. A task only says which ``(a, b)`` pairs are capability prompts, which are
safety prompts, and how a pair becomes a prompt (:class:`ArithmeticTask`).

Evaluation is held out by construction: :meth:`ArithmeticTask.splits` cuts the capability pairs and the
safety pairs into disjoint train/eval parts, every training loop here draws only from the ``*_train`` parts
(PTX batches, KL prompts, gradient references, activation bases), and :meth:`ArithmeticTask.evaluate`
reports the ``*_eval`` scores with the train-split scores beside them, so fitting is visible.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..objectives import margin_loss, tempered_loss

P = 23
PLUS, EQ, MARKER, REFUSE, BOS = P, P + 1, P + 2, P + 3, P + 4
VOCAB_SIZE = P + 5
PROMPT_LEN = 5
IGNORE = -100

METHODS = ("plain", "ptx", "kl", "projected", "activation")


def all_pairs() -> torch.Tensor:
    """``[P*P, 2]`` every ``(a, b)`` pair, in a fixed order."""
    a = torch.arange(P).repeat_interleave(P)
    b = torch.arange(P).repeat(P)
    return torch.stack([a, b], dim=1)


def _check_pairs(pairs: Any, name: str) -> torch.Tensor:
    if not isinstance(pairs, torch.Tensor):
        raise TypeError(f"{name} must be a [n, 2] integer tensor of (a, b) pairs, got {type(pairs).__name__}")
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"{name} must have shape [n, 2], got {list(pairs.shape)}")
    if pairs.dtype.is_floating_point or pairs.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {pairs.dtype}")
    if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= P):
        raise ValueError(f"{name} holds operands outside 0..{P - 1}")
    return pairs.long()


@dataclass(frozen=True)
class Splits:
    """Disjoint train/eval ``[n, 2]`` pair tensors for each side of a task.

    ``capability_train`` feeds everything that protects capability (PTX, KL prompts, reference gradients,
    activation bases); ``safety_train`` the safety loss. Scores are reported on ``*_eval``.
    """

    capability_train: torch.Tensor
    capability_eval: torch.Tensor
    safety_train: torch.Tensor
    safety_eval: torch.Tensor
    seed: int = 0
    task: str = ""

    def __post_init__(self) -> None:
        for side in ("capability", "safety"):
            tr = _check_pairs(getattr(self, f"{side}_train"), f"{side}_train")
            ev = _check_pairs(getattr(self, f"{side}_eval"), f"{side}_eval")
            if tr.shape[0] == 0 or ev.shape[0] == 0:
                raise ValueError(f"Splits: {side}_train and {side}_eval must both be non-empty "
                                 f"(got {tr.shape[0]} and {ev.shape[0]} pairs)")
            overlap = set(map(tuple, tr.tolist())) & set(map(tuple, ev.tolist()))
            if overlap:
                raise ValueError(f"Splits: {len(overlap)} pair(s) are in both {side}_train and {side}_eval, "
                                 f"e.g. {sorted(overlap)[0]}")

    def sizes(self) -> dict[str, int]:
        return {k: int(getattr(self, k).shape[0])
                for k in ("capability_train", "capability_eval", "safety_train", "safety_eval")}


def _split(pairs: torch.Tensor, train_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(pairs.shape[0], generator=generator)
    n_train = max(1, min(pairs.shape[0] - 1, round(train_fraction * pairs.shape[0])))
    return pairs[perm[:n_train]], pairs[perm[n_train:]]


def make_model(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4) -> torch.nn.Module:
    """A randomly initialised tiny ``LlamaForCausalLM`` (fixed seed; float32, CPU, train mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=16,
        bos_token_id=BOS, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.train()
    return model


class flush_denormal:
    """Flush float32 denormals to zero while training: near-converged AdamW states otherwise fill with
    denormals, which made CPU pretraining ~6x slower (64 s instead of 10 s) without changing the result."""

    def __enter__(self):
        self._set = torch.set_flush_denormal(True)

    def __exit__(self, *exc):
        if self._set:
            torch.set_flush_denormal(False)


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def reference_objective(name: str, *, temperature: float = 30.0,
                        competitor_ids: Sequence[int] | None = (REFUSE,)) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The capability objective used for reference gradients: ``"loss"`` (cross-entropy), ``"margin"``
    (:func:`~atax_kernels.objectives.margin_loss`, by default against the REFUSE token; ``competitor_ids=None``
    for the strongest competitor) or ``"tempered"`` (:func:`~atax_kernels.objectives.tempered_loss`)."""
    if name == "loss":
        return _ce
    if name == "margin":
        return lambda logits, labels: margin_loss(logits, labels, competitor_ids=competitor_ids, ignore_index=IGNORE)
    if name == "tempered":
        return lambda logits, labels: tempered_loss(logits, labels, temperature=temperature, ignore_index=IGNORE)
    raise ValueError(f"reference_objective: unknown objective {name!r}; expected 'loss', 'margin' or 'tempered'")


class ArithmeticTask:
    """A capability/safety task over ``(a, b)`` operand pairs, ``a, b in 0..P-1``.

    Subclasses define :meth:`capability_pairs`, :meth:`safety_pairs`, :meth:`capability_prompts`,
    :meth:`safety_prompts` and :meth:`pretrain_prompts`; everything else (splits, pretraining, fine-tuning,
    evaluation) is shared. Prompts are ``[n, 5]`` token ids with labels aligned to the logits (only the last
    position is supervised; no shift needed).
    """

    name = "task"
    capability_train_fraction = 0.25
    safety_train_fraction = 0.5

    # --- what a task defines -----------------------------------------------------------------------
    def capability_pairs(self) -> torch.Tensor:
        raise NotImplementedError

    def safety_pairs(self) -> torch.Tensor:
        raise NotImplementedError

    def capability_prompts(self, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def safety_prompts(self, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def pretrain_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

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
        cap_tr, cap_ev = _split(self.capability_pairs(), fractions["capability_train_fraction"], gen)
        saf_tr, saf_ev = _split(self.safety_pairs(), fractions["safety_train_fraction"], gen)
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
        ids, labels = self.capability_prompts(self._sample(_check_pairs(pairs, "pairs"), batch_size, generator))
        return ids.to(device), labels.to(device)

    def safety_batch(self, pairs: torch.Tensor, batch_size: int | None = None, *,
                     generator: torch.Generator | None = None, device: torch.device | str = "cpu"):
        """``(input_ids, labels)`` of safety prompts (answer REFUSE) for ``pairs``."""
        ids, labels = self.safety_prompts(self._sample(_check_pairs(pairs, "pairs"), batch_size, generator))
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
            ids, labels = (self.safety_prompts if safety else self.capability_prompts)(_check_pairs(pairs, "pairs"))
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
                loss = _ce(model(input_ids=ids).logits, labels)
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
        target: str = "grad",
        mode: str = "orthogonal",
        strength: float = 1.0,
        granularity: str = "global",
        ptx_weight: float = 0.0,
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
        if method not in METHODS:
            raise ValueError(f"finetune_safety: method must be one of {METHODS}, got {method!r}")
        if target not in ("grad", "update"):
            raise ValueError(f"finetune_safety: target must be 'grad' or 'update', got {target!r}")
        if impl not in ("auto", "optim", "manual"):
            raise ValueError(f"finetune_safety: impl must be 'auto', 'optim' or 'manual', got {impl!r}")
        if isinstance(n_refs, bool) or not isinstance(n_refs, int) or n_refs < 1:
            raise ValueError(f"finetune_safety: n_refs must be an int >= 1, got {n_refs!r}")
        for key, value in (("ptx_weight", ptx_weight), ("kl_weight", kl_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"finetune_safety: {key} must be a number >= 0, got {value!r}")
        if method == "ptx" and not ptx_weight > 0:
            raise ValueError("finetune_safety: method='ptx' needs ptx_weight > 0")
        if method == "kl" and not kl_weight > 0:
            raise ValueError("finetune_safety: method='kl' needs kl_weight > 0")
        if method == "projected" and ptx_weight and target == "update":
            raise ValueError("finetune_safety: ptx_weight > 0 needs target='grad' (update projection removes it again)")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"finetune_safety: refresh_every must be an int >= 1, got {refresh_every!r}")
        if copy_model:
            model = copy.deepcopy(model)
        if method == "kl" and base is None:
            base = copy.deepcopy(model).eval()
            for p in base.parameters():
                p.requires_grad_(False)
        t0 = time.perf_counter()
        run = _Run(self, model, splits, batch_size=batch_size, seed=seed)
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


class _Run:
    """One fine-tuning run's data stream: every batch comes from the train splits, one generator."""

    def __init__(self, task: ArithmeticTask, model: torch.nn.Module, splits: Splits, *, batch_size: int, seed: int):
        self.task, self.model, self.splits, self.batch_size = task, model, splits, batch_size
        self.device = next(model.parameters()).device
        self.gen = torch.Generator().manual_seed(seed)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.removed: list[float] = []
        self.info: dict[str, Any] = {}
        model.train()

    def safety(self):
        return self.task.safety_batch(self.splits.safety_train, self.batch_size, generator=self.gen, device=self.device)

    def capability(self, batch_size: int | None = None):
        return self.task.capability_batch(self.splits.capability_train, batch_size or self.batch_size,
                                          generator=self.gen, device=self.device)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def mixed_loss(self, *, lr, steps, weight_decay, ptx, kl, base) -> None:
        opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            ids, labels = self.safety()
            logits = self.logits(ids)
            loss = _ce(logits, labels)
            if ptx:
                cids, clabels = self.capability()
                loss = loss + ptx * _ce(self.logits(cids), clabels)
            if kl:
                with torch.no_grad():
                    ref = base(input_ids=ids).logits
                logp = F.log_softmax(logits, -1)
                loss = loss + kl * (logp.exp() * (logp - F.log_softmax(ref, -1))).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def projected(self, *, steps, lr, weight_decay, cap_obj, n_refs, target, mode, strength, granularity,
                  ptx_weight, ref_batch_size, backend, optimizer_kwargs) -> None:
        from ..optim import ProjectedOptimizer

        base = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        opt = ProjectedOptimizer(base, mode=mode, strength=strength, granularity=granularity, target=target,
                                 ptx_weight=ptx_weight, reference="live", max_references=max(n_refs, 1),
                                 backend=backend, **(optimizer_kwargs or {}))
        opt.zero_grad(set_to_none=True)
        for _ in range(steps):
            for _r in range(n_refs):
                ids, labels = self.capability(ref_batch_size)
                cap_obj(self.logits(ids), labels).backward()
                opt.capture_reference()
            ids, labels = self.safety()
            _ce(self.logits(ids), labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats = getattr(opt, "last_stats", None)
            if stats is not None:
                self.removed.append(float(stats.removed_fraction))

    def manual_projected(self, *, steps, lr, weight_decay, cap_obj, n_refs, target, mode, strength, granularity,
                         ptx_weight, ref_batch_size, backend) -> None:
        """The ProjectedOptimizer loop written out with :func:`atax_kernels.project_` (live references).

        ``target="grad"``: project the safety gradient, add ``ptx_weight * mean(refs)``, AdamW step.
        ``target="update"``: AdamW step, then project the descent direction ``old - new`` away from the
        references and apply the projected step.
        """
        from .. import project_

        params = self.params
        base = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            refs: list[list[torch.Tensor]] = []
            for _r in range(n_refs):
                ids, labels = self.capability(ref_batch_size)
                for p in params:
                    p.grad = None
                cap_obj(self.logits(ids), labels).backward()
                refs.append([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
                for p in params:
                    p.grad = None
            ids, labels = self.safety()
            _ce(self.logits(ids), labels).backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            for p, g in zip(params, grads):
                p.grad = g
            if target == "grad":
                stats = project_(grads, refs, mode=mode, strength=strength, granularity=granularity, backend=backend)
                self.removed.append(float(stats.removed_fraction))
                if ptx_weight:
                    for j, g in enumerate(grads):
                        g.add_(sum(r[j] for r in refs), alpha=ptx_weight / len(refs))
                base.step()
            else:
                old = [p.detach().clone() for p in params]
                base.step()
                with torch.no_grad():
                    descent = [o - p for p, o in zip(params, old)]
                    stats = project_(descent, refs, mode=mode, strength=strength, granularity=granularity,
                                     backend=backend)
                    self.removed.append(float(stats.removed_fraction))
                    for p, o, d in zip(params, old, descent):
                        p.copy_(o - d)
            for p in params:
                p.grad = None

    def activation(self, *, steps, lr, weight_decay, energy, contrast, refresh_every, ptx_weight, backend,
                   optimizer_kwargs) -> None:
        from ..activation import ActivationSubspace
        from ..optim import ProjectedOptimizer

        kwargs = dict(optimizer_kwargs or {})
        sub = ActivationSubspace(self.model, energy=energy, contrast=contrast, **kwargs.pop("subspace_kwargs", {}))
        base = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        # activation_target="grad" with PTX: the PTX gradient is captured apart and added after the safety
        # gradient's projection (not projected away); otherwise PTX is part of the loss and of the update.
        through = bool(ptx_weight) and kwargs.get("activation_target") == "grad"
        opt = ProjectedOptimizer(base, activation_subspace=sub, target="grad" if through else "update",
                                 backend=backend, ptx_weight=ptx_weight if through else 0.0, **kwargs)
        cap_ids, _ = self.task.capability_batch(self.splits.capability_train, device=self.device)
        ranks: list[float] = []
        for step in range(steps):
            ids, labels = self.safety()
            with (sub.observe(side="safety") if contrast else contextlib.nullcontext()):
                logits = self.logits(ids)
            loss = _ce(logits, labels)
            if ptx_weight and through:
                cids, clabels = self.capability()
                _ce(self.logits(cids), clabels).backward()
                opt.capture_reference()
            elif ptx_weight:
                cids, clabels = self.capability()
                loss = loss + ptx_weight * _ce(self.logits(cids), clabels)
            loss.backward()
            # Refresh after the safety forward, so a contrast basis always has safety moments (the first one
            # included), and after the backward: with LoRA, update() edits lora_A (lora="input"), which the
            # loss graph saved.
            if step % refresh_every == 0:
                with torch.no_grad(), sub.observe():
                    self.logits(cap_ids)
                sub.update()
                r = [v for k, v in sub.ranks().items() if not k.endswith(".lora_B")]
                ranks.append(sum(r) / max(1, len(r)))
            opt.step()
            opt.zero_grad(set_to_none=True)
            act = getattr(opt.last_stats, "activation", None)
            if act is not None:
                self.removed.append(float(act.update_removed_fraction))
        self.info["feature_rank_mean"] = sum(ranks) / max(1, len(ranks))
