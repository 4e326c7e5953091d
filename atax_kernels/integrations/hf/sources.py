"""Where a gradient reference's capability loss comes from: :class:`CapabilitySource` (cycled batches and/or a
loss function), the normalisation of what ``attach(reference=...)`` accepts into one (:func:`as_source`), and the
RNG snapshot/restore that lets a resumed run draw the same capability batches."""
from __future__ import annotations

import inspect
import random
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch

from ..._batches import _generators, check_batch
from ...references.subspace import Subspace

__all__ = ["CapabilitySource", "as_source", "refuse_model_or_tensor", "binds"]


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"reference batches must be dicts of model inputs (model(**batch).loss), got {type(batch).__name__}; "
            f"pass CapabilitySource(batches, loss_fn=lambda model, batch: ...) for other batch types"
        )
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError(
            "model(**batch) returned no loss for a reference batch: include 'labels' in the capability batches, "
            "or pass CapabilitySource(batches, loss_fn=lambda model, batch: ...)"
        )
    return loss


def _rng_snapshot(batches: Any) -> dict[str, Any]:
    """The CPU RNG states an iterable's order can depend on, in types ``torch.load(weights_only=True)`` reads."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "generators": [g.get_state() for g in _generators(batches)]}


def _rng_restore(batches: Any, state: Mapping[str, Any], *, generators: bool) -> None:
    """Set the RNG states of :func:`_rng_snapshot` back; the loader's own generators only with ``generators``."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if generators:
        gens = _generators(batches)
        if len(gens) == len(state["generators"]):
            for g, st in zip(gens, state["generators"]):
                g.set_state(st)


class CapabilitySource:
    """Where the capability loss comes from.

    Args:
        batches: an iterable of batches (a ``DataLoader``, a list of dicts, ...), cycled: re-iterated when
            exhausted. ``None`` when ``loss_fn`` needs no batch.
        loss_fn: ``loss_fn(model, batch) -> loss`` (with ``batches``) or ``loss_fn(model) -> loss`` (without).
            Default: ``model(**batch).loss``. ``model`` is the module the trainer passes to ``training_step``
            (DDP/FSDP-wrapped); tensors of ``batch`` are moved to the trainer's device first.
    """

    def __init__(self, batches: Iterable | None = None, loss_fn: Callable[..., torch.Tensor] | None = None):
        if batches is None and loss_fn is None:
            raise ValueError("CapabilitySource needs batches, a loss_fn, or both")
        if batches is not None and (isinstance(batches, (torch.Tensor, str, bytes, Mapping))
                                    or not isinstance(batches, Iterable)):
            raise TypeError(f"batches must be an iterable of batches (a DataLoader, a list of dicts), "
                            f"got {type(batches).__name__}")
        if batches is not None:
            refuse_model_or_tensor(batches, "batches")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable")
        if loss_fn is not None and not binds(loss_fn, 1 if batches is None else 2):
            want = "(model) -> loss (no batches given)" if batches is None else "(model, batch) -> loss"
            raise TypeError(f"loss_fn must take {want}")
        self.batches, self.loss_fn = batches, loss_fn
        self._it = None
        self._position = 0          # batches drawn from the current pass
        self._pass_rng: dict[str, Any] | None = None   # the RNG states right before the current pass began
        self._resume: dict[str, Any] | None = None

    def _next_batch(self) -> Any:
        if self._resume is not None:
            self._fast_forward()
        for attempt in range(2):
            if self._it is None:
                self._pass_rng = _rng_snapshot(self.batches)
                self._it = iter(self.batches)
                self._position = 0
            try:
                batch = next(self._it)
                self._position += 1
                check, self._first_check = getattr(self, "_first_check", None), None
                if check is not None:   # not a list/DataLoader, so not pulled ahead at attach(): its first batch
                    check_batch(check[0], batch, where=check[1], needs_loss=True, one_shot=True)
                return batch
            except StopIteration:
                self._it = None
        raise ValueError("the reference batches are empty (or a one-shot iterator that is exhausted); "
                         "pass a re-iterable such as a list or a DataLoader")

    def state_dict(self) -> dict[str, Any]:
        """The stream position: batches drawn from the current pass and the RNG states it began with."""
        if self.batches is None or self._it is None:
            return {"position": 0, "rng": None}
        return {"position": self._position, "rng": self._pass_rng}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position at the next batch: the pass is re-begun under its saved RNG states
        (so a shuffled DataLoader draws the same order) and the batches already used are skipped."""
        self._it, self._resume = None, dict(state)

    def _fast_forward(self) -> None:
        state, self._resume = self._resume, None
        position, rng = int(state.get("position", 0)), state.get("rng")
        if self.batches is None or rng is None:
            return
        now = _rng_snapshot(self.batches)
        _rng_restore(self.batches, rng, generators=True)
        self._pass_rng, self._it = rng, iter(self.batches)
        try:
            for _ in range(position):
                next(self._it)
        except StopIteration:
            raise ValueError(f"resuming the capability stream: the reference batches have fewer than the "
                             f"{position} batches drawn before the checkpoint") from None
        finally:
            # The trainer restored its own RNG for this step; replaying the pass must not consume it. The
            # loader's own generators stay where the replay left them, as in the uninterrupted run.
            _rng_restore(self.batches, now, generators=False)
        self._position = position

    def loss(self, model: torch.nn.Module, device: torch.device) -> torch.Tensor:
        """The capability loss of the next batch (moved to ``device``), or ``loss_fn(model)`` without batches."""
        if self.batches is None:
            return self.loss_fn(model)
        batch = _to_device(self._next_batch(), device)
        return (self.loss_fn or _default_loss)(model, batch)

    def __repr__(self) -> str:
        return f"CapabilitySource(batches={type(self.batches).__name__}, loss_fn={self.loss_fn!r})"


def binds(fn: Callable[..., Any], n: int) -> bool:
    """Whether ``fn`` can be called with ``n`` positional arguments (True when its signature is unknown)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(*([None] * n))
    except TypeError:
        return False
    return True


_REFERENCE_KINDS = ("capability batches (model(**batch).loss is used), a callable (model) -> loss, "
                    "CapabilitySource(batches, loss_fn=...), EMA(...) or a Subspace")


def refuse_model_or_tensor(value: Any, name: str) -> None:
    """A model or a tensor is a common mistake for a reference: say what to pass instead."""
    if isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} is a torch.nn.Module ({type(value).__name__}): attach() does not take a model as "
                        f"the reference (it uses the trainer's own model); pass {_REFERENCE_KINDS}")
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} is a tensor (a loss computed once?): the capability loss must be recomputed at "
                        f"every refresh; pass {_REFERENCE_KINDS}")


def as_source(reference: Any) -> CapabilitySource:
    """``reference`` (batches, a ``(model) -> loss`` callable, or a ``CapabilitySource``) as a CapabilitySource.
    A Subspace is refused (it has no loss); :class:`~.ema.EMA` refuses itself before calling this."""
    if isinstance(reference, CapabilitySource):
        return reference
    if isinstance(reference, Subspace):
        raise TypeError(f"{type(reference).__name__} cannot be the source of an EMA")
    refuse_model_or_tensor(reference, "reference")
    if callable(reference) and not isinstance(reference, Iterable):
        if not binds(reference, 1):
            if binds(reference, 2):
                raise TypeError("a reference callable takes (model) and returns the capability loss; for "
                                "(model, batch) pass CapabilitySource(batches, loss_fn=...)")
            if binds(reference, 0):
                raise TypeError("a reference callable for attach() takes the model: (model) -> loss (attach passes "
                                "the trainer's DDP/FSDP-wrapped module); got one that takes no arguments. Use "
                                "reference=lambda model: ... (ProjectedOptimizer(reference_fn=...) is the one "
                                "called with no arguments)")
            raise TypeError("a reference callable takes (model) and returns the capability loss")
        return CapabilitySource(None, reference)
    return CapabilitySource(reference)
