"""The one gradient stash: set the safety gradients aside while a capability backward runs in the same
``.grad`` slots, take the capability gradients, and put the safety gradients back. Used by
``ProjectedOptimizer`` (``reference_fn``), the HF ``attach`` capture and ``project_model_``. A leaf.

Plain gradients move without a copy (``p.grad = None``; the capability backward allocates fresh ones). A gradient
that is a view of a shared buffer (DDP ``gradient_as_bucket_view``: ``g._base is not None``) must stay where it is,
since DDP keeps writing into its bucket: it is cloned and the view zeroed, so the capability backward accumulates
into zeros; :meth:`GradStash.restore` copies the (possibly projected) safety values back into the view.
"""
from __future__ import annotations

import torch

__all__ = ["GradStash"]


class GradStash:
    """Safety gradients set aside for the duration of a capability backward.

    >>> stash = GradStash(params)            # safety grads aside (views zeroed)
    >>> capability_loss.backward()
    >>> caps = stash.capability()            # capability grads, one per parameter (None where none)
    >>> stash.restore()                      # safety grads back (into their bucket views where they were views)

    :meth:`safety` gives the set-aside safety gradients (clones for views) to project in place before
    :meth:`restore`; :meth:`restore` is also the abort path (call it in ``finally``).
    """

    def __init__(self, params: list[torch.Tensor]):
        self._entries: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
        with torch.no_grad():
            for p in params:
                g = p.grad
                if g is None:
                    self._entries.append((p, None, None))
                elif g._base is not None:
                    saved = g.detach().clone()
                    g.zero_()
                    self._entries.append((p, saved, g))
                else:
                    p.grad = None
                    self._entries.append((p, g, None))

    def capability(self, *, copy_views: bool = True) -> list[torch.Tensor | None]:
        """The gradients the capability backward left, aligned with the parameters, detached. Plain ones are
        taken out of ``.grad`` (no copy); bucket views are cloned (``copy_views``, as :meth:`restore` overwrites
        them) or returned as they are (read them before :meth:`restore`)."""
        out: list[torch.Tensor | None] = []
        for p, _saved, view in self._entries:
            g = p.grad
            if g is None:
                out.append(None)
            elif view is not None or g._base is not None:
                out.append(g.detach().clone() if copy_views else g.detach())
            else:
                out.append(g.detach())
                p.grad = None
        return out

    def safety(self) -> list[torch.Tensor | None]:
        """The set-aside safety gradients (clones for bucket views), aligned with the parameters."""
        return [saved for _p, saved, _view in self._entries]

    def restore(self) -> None:
        """Put the safety gradients back: plain ones as ``.grad`` (None where there was none), view ones copied
        into their views. Idempotent."""
        with torch.no_grad():
            for p, saved, view in self._entries:
                if view is not None:
                    view.copy_(saved)
                    p.grad = view
                else:
                    p.grad = saved
        self._entries = []
