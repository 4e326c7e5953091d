"""The ``ActivationSubspace`` step of :class:`~.handle.AtaxHandle`: observe the training batch as the safety side
(``contrast`` > 0), refresh the bases when due, and project the realised update of every optimizer step through
step hooks on the torch optimizer (the one implementation in :mod:`atax_kernels.activation.apply`)."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable

import torch

from ...activation import ActivationSubspace
from ...activation.apply import UpdateSnapshot
from ...activation.schedule import refresh_if_due

__all__ = ["ActivationStep"]


class ActivationStep:
    """Mixin of :class:`~.handle.AtaxHandle` for ``reference=ActivationSubspace``. Its optimizer hooks live in
    ``self._act_hooks`` (on ``self._act_opt``); ``self._act_snapshot`` holds the pre-step copy between them."""

    def _observe_training_batch(self, args: tuple, kwargs: dict) -> Any:
        """With an ActivationSubspace of contrast > 0: the training batch's own forward is the safety side."""
        sub = self.reference
        if isinstance(sub, ActivationSubspace) and self._resume_state is not None:
            # Before this batch is observed: loading replaces the moments gathered since the last update()
            # with the checkpoint's (the safety side between refreshes), so the resumed run is bit-exact.
            self._apply_resume_state(self._params())
        if not isinstance(sub, ActivationSubspace) or sub.contrast == 0:
            return contextlib.nullcontext()
        inputs = args[1] if len(args) > 1 else kwargs.get("inputs")
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        return sub.observe(side="safety", attention_mask=mask)

    def _activation_sync_step(self, params: list[torch.Tensor]) -> None:
        """Refresh the bases when due and make sure the optimizer's step projects its realised update."""
        sub = self.reference
        if self._resume_state is not None:
            self._apply_resume_state(params)
        self._refresh_activation_if_due(sub)
        self.steps += 1
        opt = self.trainer.optimizer
        while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
            opt = opt.optimizer   # accelerate's AcceleratedOptimizer wraps the torch optimizer
        if getattr(self, "_act_opt", None) is not opt:
            self._remove_activation_hooks()
            self._act_opt = opt
            self._act_hooks = [opt.register_step_pre_hook(lambda o, a, k: self._act_before_step()),
                               opt.register_step_post_hook(lambda o, a, k: self._act_after_step())]

    def _refresh_activation_if_due(self, sub: ActivationSubspace,
                                   around: Callable[[], Any] = contextlib.nullcontext) -> None:
        """The refresh of both trainer paths (plain and DeepSpeed): re-observe the loader (or, without one, turn
        what was observed into bases) when ``refresh_every`` says so, inside ``around()``. Step 0 refreshes only
        when there are no bases yet, or with ``contrast`` > 0 (the first training batch was just observed as the
        safety side)."""
        def rebuild(tol: float | None) -> bool:
            with around():
                if sub.loader is not None:
                    return sub.refresh(tol=tol)
                sub.update()  # attach refuses a drift-checked schedule without a loader: tol is None here
                return True

        refresh_if_due(self.refresh_every, self.steps, rebuild, at_start=sub.contrast > 0 or sub.updates == 0)

    def _remove_activation_hooks(self) -> None:
        for h in getattr(self, "_act_hooks", []):
            h.remove()
        self._act_hooks, self._act_opt = [], None

    def _act_before_step(self) -> None:
        managed = {id(p) for p in self._params()}
        self._act_snapshot = UpdateSnapshot.take(self.reference, managed)

    @torch.no_grad()
    def _act_after_step(self) -> None:
        snapshot, self._act_snapshot = getattr(self, "_act_snapshot", None), None
        if snapshot is None or not snapshot.protected:
            return   # nothing of the subspace is stepped by this optimizer: nothing to project or log
        self.last_activation = snapshot.project(self.backend)
        self._unlogged = True
        self._window_add(self._activation_step_values(self.last_activation))
