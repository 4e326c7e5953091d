"""Using an ``ActivationSubspace`` around an optimizer step, implemented once for every optimizer and trainer:
snapshot the protected parameters, let the inner optimizer step, project its realised update
(:class:`UpdateSnapshot`); the stats of a step with nothing to project (:func:`empty_stats`); the refresh of the
bases from a capability forward (:func:`refresh`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from .._dtensor import local
from .stats import ActivationStats

if TYPE_CHECKING:  # annotations only: the subspace module does not need this one, nor this one it
    from .subspace import ActivationSubspace

__all__ = ["UpdateSnapshot", "empty_stats", "refresh"]


def empty_stats(sub: "ActivationSubspace", device: torch.device) -> ActivationStats:
    """The stats of a step that projected nothing: the subspace's ranks, no rows, a removed fraction of 0."""
    return ActivationStats(ranks=sub.ranks(), names=[],
                           per_target=torch.zeros((0, 2), dtype=torch.float64, device=device),
                           update_removed_fraction=torch.zeros((), dtype=torch.float64, device=device))


def refresh(sub: "ActivationSubspace", forward: Callable[[], Any], tol: float | None = None) -> bool:
    """Recompute ``sub``'s bases from one capability pass: ``forward()`` (its return value is ignored) runs
    under ``sub.observe()`` with the model in eval mode, the model's train mode is restored, then
    ``sub.update()`` — or, with ``tol``, ``sub.update_if_drifted(tol)`` (keeps the bases that still hold what
    was observed). Returns whether the bases were rebuilt."""
    if tol is not None:
        sub._check_drift_args(tol, "refresh(tol=...)")  # before the forward, not after
    was_training = sub.model.training
    sub.model.eval()  # as observe_loader: capability inputs without dropout noise widening the span
    try:
        with sub.observe():
            forward()
    finally:
        sub.model.train(was_training)
    if tol is not None:
        return sub.update_if_drifted(tol)
    sub.update()
    return True


class UpdateSnapshot:
    """The protected parameters' local values (local shards under FSDP2) before an inner optimizer step: the
    one copy the realised-update projection needs. Take it, step the inner optimizer, then :meth:`project`.

    Attributes:
        sub: the subspace whose bases the update is projected off.
        protected: the parameters of ``sub.parameters()`` the optimizer manages, in that order.
        deltas: their local values before the step; :meth:`project` turns them into the projected update and
            then drops them.
    """

    def __init__(self, sub: "ActivationSubspace", protected: list[torch.Tensor],
                 deltas: list[torch.Tensor]) -> None:
        self.sub, self.protected, self.deltas = sub, protected, deltas

    @classmethod
    def take(cls, sub: "ActivationSubspace", managed_param_ids: set[int]) -> "UpdateSnapshot":
        """Copy the local values of the parameters of ``sub.parameters()`` whose ``id`` is in
        ``managed_param_ids`` (the ones the stepping optimizer updates)."""
        protected = [p for p in sub.parameters() if id(p) in managed_param_ids]
        deltas = [local(p.detach()).clone() for p in protected]
        return cls(sub, protected, deltas)

    def project(self, backend: str | None = None, *, device: torch.device | None = None) -> ActivationStats:
        """After the inner step: project the realised update ``dW = new - old`` of every protected parameter
        off the bases, in place, so the weights end at ``old + P(dW)``; return the step's stats.

        On an error (the projection checks everything before it writes) the parameters are left at the plain
        step's values and the error is re-raised. With no protected parameter nothing is projected and the
        result is :func:`empty_stats` on ``device`` (the optimizer's first parameter's device; CPU if None).
        """
        deltas, self.deltas = self.deltas, []  # one use: the copy is freed with this call
        if not self.protected:
            return empty_stats(self.sub, device if device is not None else torch.device("cpu"))
        now = [local(p.detach()) for p in self.protected]
        torch._foreach_sub_(deltas, now)
        torch._foreach_neg_(deltas)     # realised update dW = new - old
        torch._foreach_sub_(now, deltas)  # back to old (exact where old and new are within 2x: Sterbenz)
        try:
            stats = self.sub.project_updates_(self.protected, deltas, backend=backend)
        except BaseException:
            torch._foreach_add_(now, deltas)  # deltas untouched on error: leave the plain step, then raise
            raise
        torch._foreach_add_(now, deltas)  # old + projected dW
        return stats
