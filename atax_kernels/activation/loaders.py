"""Observing a whole loader: ``observe_loader`` (no grad, eval mode, each batch's positions chosen by
``positions``), ``from_loader`` (build, observe, update, keep the loader) and ``refresh`` (observe it again)."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .._batches import check_first
from .settings import POSITIONS, check_one_of

__all__ = ["LoaderMixin", "positions_mask", "default_forward"]


class LoaderMixin:
    """``observe_loader``, ``refresh`` and ``from_loader`` (part of ``ActivationSubspace``)."""

    def observe_loader(self, loader: Iterable[Any], *, side: str = "capability",
                       forward: Callable[[nn.Module, Any], Any] | None = None,
                       max_batches: int | None = None, positions: str | None = None) -> int:
        """Observe every batch of ``loader`` (no grad, model in eval mode) and return the number of batches.

        A batch may be a dict (HF style: passed as keywords, ``labels`` dropped, its ``attention_mask``
        excludes padding), a tensor (passed as the model's input) or a tuple/list (its first element is the
        input). ``forward(model, batch)`` overrides this.

        ``positions``: ``"all"`` (default: every unpadded position), ``"answer"`` (positions whose ``labels``
        are not -100: the bases protect what the model computes while answering) or ``"prompt"`` (the
        others). Needs dict batches with ``labels``. Default: the one given to :meth:`from_loader`, else all.
        """
        positions = positions or self.positions or "all"
        check_one_of(positions, "positions", POSITIONS)
        n = 0
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        was_training = self.model.training
        self.model.eval()  # capability inputs as inference sees them: no dropout noise widening the span
        with torch.no_grad():
            for batch in (loader if max_batches is None else itertools.islice(loader, max_batches)):
                mask = positions_mask(batch, positions, n)
                with self.observe(side=side, attention_mask=mask):
                    if forward is not None:
                        forward(self.model, batch)
                    else:
                        default_forward(self.model, batch, device)
                n += 1
        self.model.train(was_training)
        return n

    def refresh(self, decay: float = 0.0, *, tol: float | None = None) -> bool:
        """Observe the loader given to :meth:`from_loader` again (from the current model) and update.

        ``tol``: rebuild only if the bases moved (:meth:`update_if_drifted` with this ``tol``; not with
        ``decay``); returns whether the bases were rebuilt (always ``True`` without ``tol``). The same loader is
        observed each time, so the check measures the model's drift (see :class:`RefreshSchedule`)."""
        if self.loader is None:
            raise RuntimeError("refresh() needs the loader of ActivationSubspace.from_loader()")
        if tol is not None and decay:
            raise ValueError("refresh(): tol (keep bases that did not move) and decay (average the moments) "
                             "exclude each other")
        if tol is not None:
            self._check_drift_args(tol, "refresh(tol=...)")  # before the forwards, not after
        n = self.observe_loader(self.loader, forward=self.forward_fn, max_batches=self.max_batches)
        if n == 0:
            raise RuntimeError("refresh(): the loader yielded no batch (an exhausted iterator?); the bases were "
                               "left as they were")
        if tol is not None:
            return self.update_if_drifted(tol)
        self.update(decay)
        return True

    @classmethod
    def from_loader(cls, model: nn.Module, loader: Iterable[Any], *,
                    forward: Callable[[nn.Module, Any], Any] | None = None, max_batches: int | None = None,
                    positions: str = "all", **kwargs: Any) -> "ActivationSubspace":  # noqa: F821
        """An ``ActivationSubspace(model, **kwargs)`` that has observed every batch of ``loader`` and updated.

        The loader is kept (``refresh()``, ``attach(refresh_every=N)`` re-observe it from the current model),
        and so is ``positions`` (see :meth:`observe_loader`).
        """
        # the first batch has the model's inputs (peeked, nothing consumed)
        check_first(model, loader, where="ActivationSubspace.from_loader: the capability loader",
                    needs_loss=False, custom=forward is not None)
        check_one_of(positions, "positions", POSITIONS)
        if iter(loader) is loader:
            raise TypeError("from_loader: loader is a one-shot iterator (a generator?); refresh() must be able to "
                            "observe it again: pass a re-iterable (a list, a DataLoader)")
        sub = cls(model, **kwargs)
        sub.loader, sub.forward_fn, sub.max_batches, sub.positions = loader, forward, max_batches, positions
        n = sub.observe_loader(loader, forward=forward, max_batches=max_batches)
        if n == 0:
            raise ValueError("from_loader: the loader yielded no batch")
        sub.update()
        return sub


def positions_mask(batch: Any, positions: str, index: int) -> torch.Tensor | None:
    """The observe() mask of a loader batch: its attention mask, narrowed to answer or prompt positions."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if positions == "all":
        return mask
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not isinstance(labels, torch.Tensor):
        keys = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"positions={positions!r} needs dict batches with 'labels' (-100 on prompt positions); "
                         f"batch {index} of the loader has {keys}")
    answer = labels != -100
    valid = mask.to(answer.device) != 0 if isinstance(mask, torch.Tensor) else torch.ones_like(answer)
    return (valid & answer) if positions == "answer" else (valid & ~answer)


def default_forward(model: nn.Module, batch: Any, device: torch.device) -> Any:
    def mv(t: Any) -> Any:
        return t.to(device) if isinstance(t, torch.Tensor) else t

    if isinstance(batch, dict):
        return model(**{k: mv(v) for k, v in batch.items() if k != "labels"})
    if isinstance(batch, torch.Tensor):
        return model(mv(batch))
    if isinstance(batch, (list, tuple)) and batch:
        return model(mv(batch[0]))
    raise TypeError(f"cannot feed a batch of type {type(batch).__name__} to the model; pass forward=")
