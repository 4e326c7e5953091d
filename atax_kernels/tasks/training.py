"""The safety fine-tuning loops, one per mitigation, over one run's stream of train-split batches
(:class:`FinetuneRun`), and the losses they use (:func:`cross_entropy`, :func:`reference_objective`).

Every loop is written with the library's public API (``torch.optim.AdamW``, :class:`~atax_kernels.ProjectedOptimizer`,
:func:`~atax_kernels.project_`, :class:`~atax_kernels.ActivationSubspace` and its
:func:`~atax_kernels.activation.apply.refresh`), as a user's own loop would be.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..objectives import margin_loss, tempered_loss
from .data import IGNORE, REFUSE, Splits


class flush_denormal:
    """Flush float32 denormals to zero while training: near-converged AdamW states otherwise fill with
    denormals, which made CPU pretraining ~6x slower (64 s instead of 10 s) without changing the result."""

    def __enter__(self):
        self._set = torch.set_flush_denormal(True)

    def __exit__(self, *exc):
        if self._set:
            torch.set_flush_denormal(False)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the supervised (non-``IGNORE``) positions."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def reference_objective(name: str, *, temperature: float = 30.0,
                        competitor_ids: Sequence[int] | None = (REFUSE,)) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The capability objective used for reference gradients: ``"loss"`` (cross-entropy), ``"margin"``
    (:func:`~atax_kernels.objectives.margin_loss`, by default against the REFUSE token; ``competitor_ids=None``
    for the strongest competitor) or ``"tempered"`` (:func:`~atax_kernels.objectives.tempered_loss`)."""
    if name == "loss":
        return cross_entropy
    if name == "margin":
        return lambda logits, labels: margin_loss(logits, labels, competitor_ids=competitor_ids, ignore_index=IGNORE)
    if name == "tempered":
        return lambda logits, labels: tempered_loss(logits, labels, temperature=temperature, ignore_index=IGNORE)
    raise ValueError(f"reference_objective: unknown objective {name!r}; expected 'loss', 'margin' or 'tempered'")


class FinetuneRun:
    """One fine-tuning run's data stream (every batch from the train splits, one generator) and its loops.

    ``removed`` collects the fraction each step's projection removed; ``info`` extra results of a loop.
    """

    def __init__(self, task: Any, model: torch.nn.Module, splits: Splits, *, batch_size: int, seed: int):
        self.task, self.model, self.splits, self.batch_size = task, model, splits, batch_size
        self.device = next(model.parameters()).device
        self.gen = torch.Generator().manual_seed(seed)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.removed: list[float] = []
        self.info: dict[str, Any] = {}
        model.train()

    def safety(self):
        """A random ``safety_train`` batch ``(input_ids, labels)``."""
        return self.task.safety_batch(self.splits.safety_train, self.batch_size, generator=self.gen, device=self.device)

    def capability(self, batch_size: int | None = None):
        """A random ``capability_train`` batch (of ``batch_size``, default the run's)."""
        return self.task.capability_batch(self.splits.capability_train, batch_size or self.batch_size,
                                          generator=self.gen, device=self.device)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def mixed_loss(self, *, lr, steps, weight_decay, ptx, kl, base) -> None:
        """``plain`` / ``ptx`` / ``kl``: AdamW on the safety loss plus ``ptx`` x the capability loss and ``kl`` x
        KL(policy || base) on the safety batch."""
        opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            ids, labels = self.safety()
            logits = self.logits(ids)
            loss = cross_entropy(logits, labels)
            if ptx:
                cids, clabels = self.capability()
                loss = loss + ptx * cross_entropy(self.logits(cids), clabels)
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
        """``projected``: :class:`~atax_kernels.ProjectedOptimizer` around AdamW, ``n_refs`` live references
        captured from ``capability_train`` batches every step."""
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
            cross_entropy(self.logits(ids), labels).backward()
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
            cross_entropy(self.logits(ids), labels).backward()
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
        """``activation``: :class:`~atax_kernels.ActivationSubspace` bases of ``capability_train`` (refreshed every
        ``refresh_every`` steps), AdamW's realised update projected off them by
        ``ProjectedOptimizer(activation_subspace=...)``; ``ptx_weight`` adds the PTX term."""
        from ..activation import ActivationSubspace
        from ..activation.apply import refresh
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

        @torch.no_grad()
        def capability_forward() -> None:
            self.logits(cap_ids)

        ranks: list[float] = []
        for step in range(steps):
            ids, labels = self.safety()
            with (sub.observe(side="safety") if contrast else contextlib.nullcontext()):
                logits = self.logits(ids)
            loss = cross_entropy(logits, labels)
            if ptx_weight and through:
                cids, clabels = self.capability()
                cross_entropy(self.logits(cids), clabels).backward()
                opt.capture_reference()
            elif ptx_weight:
                cids, clabels = self.capability()
                loss = loss + ptx_weight * cross_entropy(self.logits(cids), clabels)
            loss.backward()
            # Refresh after the safety forward, so a contrast basis always has safety moments (the first one
            # included), and after the backward: with LoRA, update() edits lora_A (lora="input"), which the
            # loss graph saved.
            if step % refresh_every == 0:
                refresh(sub, capability_forward)
                r = [v for k, v in sub.ranks().items() if not k.endswith(".lora_B")]
                ranks.append(sum(r) / max(1, len(r)))
            opt.step()
            opt.zero_grad(set_to_none=True)
            act = getattr(opt.last_stats, "activation", None)
            if act is not None:
                self.removed.append(float(act.update_removed_fraction))
        self.info["feature_rank_mean"] = sum(ranks) / max(1, len(ranks))
