"""Checks of capability batches before they are used: the first batch is looked at once, up front.

Shared by ``attach()`` (gradient references: ``model(**batch).loss``) and ``ActivationSubspace.from_loader``
(a no-grad ``model(**batch)`` without ``labels``). A batch without the model's inputs otherwise fails deep inside
the model ("You must specify exactly one of input_ids or inputs_embeds"), and a gradient reference without
labels at the first optimizer step; here both are refused with the loader named and the batch's keys listed.

Peeking never consumes what the caller will iterate: a sequence is indexed (``batches[0]``); a ``DataLoader``
is iterated once through a fresh iterator (its first batch is loaded twice), with the RNG states its order can
depend on (torch, Python, NumPy, the loader's own generators) restored afterwards, so a shuffled loader draws the
same order as without the check. Anything else (a generator, an iterator, a custom iterable, which may count or
stream what it yields) is not pulled ahead: callers check its first batch lazily, when it is drawn
(:func:`lazy_note` says so in the message); ``ActivationSubspace.from_loader`` leaves it unchecked.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["NOT_PEEKABLE", "peek_first", "check_batch", "check_first", "lazy_note"]

NOT_PEEKABLE = object()
_INPUTS = ("input_ids", "inputs_embeds")


def _generators(batches: Any) -> list[torch.Generator]:
    gens: list[torch.Generator] = []
    for obj in (batches, getattr(batches, "sampler", None),
                getattr(getattr(batches, "batch_sampler", None), "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in gens):
            gens.append(g)
    return gens


def peek_first(batches: Any) -> Any:
    """The first batch of a sequence or a ``DataLoader``, without consuming anything the caller iterates later;
    ``NOT_PEEKABLE`` for anything else (see the module docstring); ``None`` when it is empty (the callers' own
    emptiness checks report that)."""
    if isinstance(batches, Sequence) and not isinstance(batches, (str, bytes)):
        return batches[0] if len(batches) > 0 else None
    if not isinstance(batches, torch.utils.data.DataLoader):
        return NOT_PEEKABLE
    import random

    import numpy as np

    gens = _generators(batches)
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state(), [g.get_state() for g in gens])
    it = iter(batches)
    try:
        return next(it, None)
    finally:
        del it   # a DataLoader's worker processes shut down with their iterator
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])
        for g, st in zip(gens, saved[3]):
            g.set_state(st)


def _forward_params(model: Any) -> tuple[str, set[str], set[str]] | None:
    """(class name, named forward parameters, those without a default) of the model, or of what it wraps (DDP
    ``.module``, PEFT ``get_base_model()``) when its own forward is ``(*args, **kwargs)``; None when nothing
    names its inputs."""
    seen: list[Any] = []
    todo = [model]
    while todo:
        m = todo.pop(0)
        if m is None or any(m is s for s in seen):
            continue
        seen.append(m)
        try:
            sig = inspect.signature(m.forward)
        except (TypeError, ValueError, AttributeError):
            sig = None
        if sig is not None:
            named = {n for n, p in sig.parameters.items()
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            if named:
                required = {n for n in named if sig.parameters[n].default is inspect.Parameter.empty}
                return type(m).__name__, named, required
        todo.append(getattr(m, "module", None))
        base = getattr(m, "get_base_model", None)
        if callable(base):
            try:
                todo.append(base())
            except Exception:  # pragma: no cover - a wrapper whose base is not ready
                pass
    return None


def lazy_note(one_shot: bool) -> str:
    return (" (checked when the first batch was drawn: the loader is not a list or a DataLoader, e.g. a one-shot "
            "iterator, so it is not pulled ahead)") if one_shot else ""


def check_batch(model: Any, batch: Any, *, where: str, needs_loss: bool, one_shot: bool = False) -> None:
    """Refuse a first batch that ``model(**batch)`` cannot use.

    Args:
        model: the model the batches are fed to (its ``forward`` signature names the inputs it takes).
        batch: the first batch.
        where: what the batches are, for the message (e.g. ``"attach(reference=...): the capability loader"``).
        needs_loss: gradient references: ``model(**batch).loss`` must exist, so a model whose forward takes
            labels (``labels``, ``start_positions``/``end_positions``, ...) needs them in the batch.
        one_shot: the batch was checked lazily (says so in the message).

    Raises:
        TypeError: ``needs_loss`` and the batch is not a dict.
        ValueError: the batch has none of the model's inputs (``input_ids``/``inputs_embeds`` for a model
            whose forward takes them), both of them, or (``needs_loss``) no labels.
    """
    note = lazy_note(one_shot)
    if not isinstance(batch, Mapping):
        if needs_loss:
            raise TypeError(f"{where} yields {type(batch).__name__} batches{note}; gradient references need dicts "
                            f"of model inputs with labels (model(**batch).loss is the capability loss): pass "
                            f"CapabilitySource(batches, loss_fn=lambda model, batch: ...) for other batch types")
        return   # a tensor or a tuple is fed positionally (ActivationSubspace's default forward)
    keys = sorted(map(str, batch))
    found = _forward_params(model)
    if found is None:
        return
    cls, params, required = found
    missing = sorted(required - set(keys))
    if missing:
        raise ValueError(f"{where} yields batches without the model's inputs: its first batch has keys {keys}"
                         f"{note}, {cls}.forward requires {missing}")
    inputs = [k for k in _INPUTS if k in params]
    if inputs:
        given = [k for k in inputs if batch.get(k) is not None]
        if not given:
            raise ValueError(
                f"{where} yields batches without the model's inputs: its first batch has keys {keys}{note}, "
                f"{cls}.forward needs one of {inputs}. Tokenize the capability data into input_ids (and "
                f"attention_mask{', labels' if needs_loss else ''}), or pass "
                + ("CapabilitySource(batches, loss_fn=lambda model, batch: ...)" if needs_loss
                   else "forward=lambda model, batch: ...") + " to feed it yourself")
        if len(given) > 1:
            raise ValueError(f"{where}: its first batch has both input_ids and inputs_embeds (keys {keys}){note}; "
                             f"{cls}.forward takes exactly one of them")
    if needs_loss:
        wanted = sorted(p for p in params if "label" in p or p in ("start_positions", "end_positions"))
        if wanted and not any(batch.get(k) is not None for k in wanted):
            raise ValueError(
                f"{where} (gradient projection: model(**batch).loss is the capability loss) yields batches "
                f"without labels: its first batch has keys {keys}{note}, and {cls}.forward computes a loss only "
                f"from {wanted}. Add labels to the capability batches (for a causal LM: input_ids with padding "
                f"set to -100), or pass CapabilitySource(batches, loss_fn=lambda model, batch: ...)")


def check_first(model: Any, batches: Any, *, where: str, needs_loss: bool, custom: bool = False) -> bool:
    """:func:`check_batch` on the first batch of ``batches`` when it can be peeked (see :func:`peek_first`).

    ``custom``: the caller feeds the batches with its own function (``forward=``/``loss_fn=``): nothing to check.
    Returns False when the first batch could not be looked at ahead (neither a sequence nor a DataLoader): the
    caller checks it when it draws it."""
    if custom or batches is None:
        return True
    if not isinstance(batches, Iterable):
        return True   # not iterable: the caller's own type check says so
    first = peek_first(batches)
    if first is NOT_PEEKABLE:
        return False
    if first is not None:
        check_batch(model, first, where=where, needs_loss=needs_loss)
    return True
