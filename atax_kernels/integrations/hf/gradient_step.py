"""The gradient-reference step of :class:`~.handle.AtaxHandle` (capability batches, ``EMA``, ``Subspace``): on
the last micro-batch of an accumulation window, capture the capability gradient when a refresh is due (the safety
gradients set aside meanwhile) and project the accumulated safety gradients against the reference(s) in place."""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..._gradstash import GradStash
from ...projection import project_
from ...references.subspace import Subspace
from .checks import check_no_post_accumulate_hooks
from .ema import EMA
from .norms import global_norm
from .sources import CapabilitySource

__all__ = ["GradientStep"]


class GradientStep:
    """Mixin of :class:`~.handle.AtaxHandle`: :meth:`_gradient_sync_step` and the capture it runs."""

    def _inv_scale(self) -> float:
        """1 / the loss scale of accelerate's GradScaler (1 without one): captures are stored scaled."""
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
            return 1.0
        return 1.0 / float(scaler.get_scale())

    def _capture(self, model: torch.nn.Module, params: list[torch.Tensor], source: CapabilitySource
                 ) -> list[torch.Tensor | None]:
        """Stash the safety grads, backprop the capability loss, take its grads, restore the safety grads."""
        t = self.trainer
        stash = GradStash(params)
        try:
            with torch.enable_grad():
                ctx = getattr(t, "compute_loss_context_manager", None)
                with (ctx() if ctx is not None else contextlib.nullcontext()):
                    loss = source.loss(model, t.args.device)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise TypeError(f"the capability loss must be a scalar tensor, got "
                                    f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))}")
                if not loss.requires_grad:
                    raise ValueError("the capability loss does not require grad (computed under no_grad, or "
                                     "from frozen parameters only)")
                t.accelerator.backward(loss)
            captured = stash.capability(copy_views=True)
        finally:
            stash.restore()
        return captured

    def _gradient_sync_step(self, model: torch.nn.Module, params: list[torch.Tensor]) -> None:
        """Refresh the reference when due, then project the safety gradients of ``params`` in place."""
        check_no_post_accumulate_hooks(params, "atax: parameters gained post-accumulate-grad hooks after attach(): ")
        if self._resume_state is not None:
            self._apply_resume_state(params)
        ref = self.reference
        due = self.steps % self.refresh_every == 0
        if isinstance(ref, CapabilitySource) and (due or self._live is None):
            self._live = None   # free the old reference before the capability backward
            self._live = self._capture(model, params, ref)
            self._live_inv_scale = self._inv_scale()
        elif isinstance(ref, EMA) and (due or ref.count == 0):
            captured = self._capture(model, params, ref.source)
            ref.fold(captured, self._inv_scale(), self.reference_dtype)
            del captured
        self.steps += 1

        if isinstance(ref, Subspace):
            if ref.rank == 0:
                return
            if len(ref.shapes) != len(params):
                raise ValueError(f"the Subspace covers {len(ref.shapes)} tensors, the optimizer has {len(params)} "
                                 f"parameters (build it from [p for g in optimizer.param_groups for p in g['params']])")
            for i, (shape, p) in enumerate(zip(ref.shapes, params)):
                if tuple(shape) != tuple(p.shape):
                    raise ValueError(f"the Subspace's tensor {i} has shape {tuple(shape)} but the optimizer's parameter "
                                     f"{i} has {tuple(p.shape)}: build it in the optimizer's order ([p for g in "
                                     f"optimizer.param_groups for p in g['params']]; the Trainer puts the weight-decay "
                                     f"group first)")
            refs, scales = [list(v) for v in ref.basis], [1.0] * ref.rank
        elif isinstance(ref, EMA):
            if ref.count == 0:
                return
            refs, scales = [ref.buffers], [1.0]
        else:
            refs, scales = [self._live], [self._live_inv_scale]

        idx = [i for i, p in enumerate(params) if p.grad is not None and all(r[i] is not None for r in refs)]
        if not idx:
            return
        grads = [params[i].grad for i in idx]
        if isinstance(ref, Subspace) and len(idx) == len(params):
            ref_arg: Any = ref   # orthonormal shortcut (no solve)
        else:
            ref_arg = [[r[i] for i in idx] for r in refs]
        stats = project_(grads, ref_arg, mode=self.mode, strength=self.strength, granularity=self.granularity,
                         backend=self.backend)
        with torch.no_grad():
            self.last_ref_norm = torch.stack([global_norm([r[i] for i in idx]) * s for r, s in zip(refs, scales)])
        self.last_stats = stats
        self._unlogged = True
        self._window_add(self._step_values(stats, self.last_ref_norm), skipped=stats.skipped)
        if isinstance(ref, CapabilitySource) and self.refresh_every == 1:
            self._live = None   # not reused: free it now
