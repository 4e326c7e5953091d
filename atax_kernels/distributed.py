"""Distributed gradient projection: global dot products under DDP, FSDP2 and HSDP.

The projection only needs the Gram of ``[g, r_1 .. r_k]``; every coefficient is a function of it. When a
rank holds a disjoint *shard* of each vector, its local Gram is a partial sum of the global one, so one
``all_reduce(SUM)`` of the small ``[m, m]`` (or ``[n, m, m]``) Gram makes it global; every rank then solves
the same problem and applies ``g <- g - R^T c`` to its own shard. See docs/distributed.md.

* DDP: gradients are already all-reduced (averaged), every rank holds the full vectors: local dots are
  global, nothing to do.
* FSDP2 / HSDP (``fully_shard``): gradients are DTensors. :func:`atax_kernels.project_` detects them,
  works on ``to_local()`` shards and all-reduces the Gram over the mesh dimensions whose placement is
  ``Shard`` only (a ``Replicate`` dimension holds copies: summing over it would double-count).
* Plain tensors that are disjoint pieces of one gradient (FSDP1 flat parameters, a ZeRO-style flat
  partition, manual sharding): pass ``process_group=`` to :func:`project_model_`.
* DeepSpeed ZeRO engines are refused (design in docs/distributed.md).

:func:`project_model_` is the one-call entry point for plain PyTorch / accelerate training loops.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Hashable, Iterable

import torch

from .projection import ProjectionStats, _project_impl

__all__ = ["project_model_", "gram_all_reducer"]


# --- DTensor plumbing used by project_ -------------------------------------------------------------

def _dtensor_cls() -> type | None:
    # A DTensor can only exist once torch.distributed.tensor has been imported: no import cost otherwise.
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def has_dtensor(grads: list[torch.Tensor], refs: list[list[torch.Tensor]]) -> bool:
    """True when any gradient or reference tensor is a DTensor."""
    cls = _dtensor_cls()
    if cls is None:
        return False
    return any(isinstance(t, cls) for lst in [grads, *refs] for t in lst)


def gram_all_reducer(*groups: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``reduce_grams`` hook: ``all_reduce(SUM)`` of the stacked Gram over each group in turn.

    Successive sums over the groups of several mesh dimensions equal one sum over their product, so a
    tensor sharded over two mesh dimensions needs one all-reduce per dimension (a 1-D FSDP or a 2-D HSDP
    mesh needs exactly one). Groups of size 1 are skipped.
    """
    import torch.distributed as dist

    active = [g for g in groups if dist.get_world_size(g) > 1]

    def reduce(grams: torch.Tensor) -> torch.Tensor:
        grams = grams.contiguous()
        for group in active:
            dist.all_reduce(grams, op=dist.ReduceOp.SUM, group=group)
        return grams

    return reduce


def _is_sharded(placement: Any) -> bool:
    if placement.is_shard():
        return True
    return type(placement).__name__ == "_StridedShard"  # FSDP over TP: a shard, not a Shard subclass


def _reduction_key(mesh: Any, placements: tuple, label: str) -> Hashable | None:
    """``(mesh, shard mesh dims)``: the dimensions a partial Gram must be summed over; None for none."""
    dims = []
    for d, p in enumerate(placements):
        if p.is_partial():
            raise ValueError(
                f"{label} has a Partial placement on mesh dimension {d}: its local values are unreduced partial "
                f"sums, whose dot products are not partial dot products. Reduce the gradient first (FSDP2 does "
                f"this in its reduce-scatter) or redistribute it to Shard/Replicate."
            )
        if _is_sharded(p):
            dims.append(d)
        elif not p.is_replicate():
            raise ValueError(f"{label} has an unsupported placement {p!r} on mesh dimension {d}")
    if not dims or all(mesh.size(d) == 1 for d in dims):
        return None
    return (mesh, tuple(dims))


def _key_reducer(key: Hashable) -> Callable[[torch.Tensor], torch.Tensor]:
    mesh, dims = key  # type: ignore[misc]
    return gram_all_reducer(*[mesh.get_group(d) for d in dims])


def _local(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # the local tensor itself, not an autograd view: combine_ writes into it
        return t.to_local()


def localize(
    grads: list[torch.Tensor], refs: list[list[torch.Tensor]], labels: list[str],
    reduce_grams: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], Callable | None, Callable | None]:
    """DTensor inputs -> (local grads, local refs, reduce_grams hook, backend wrapper or None).

    Every tensor at one position must be a DTensor on the same mesh with the same placements (or all be
    plain tensors, then taken as identical on every rank). When all positions need the same reduction the
    Gram is reduced by one all-reduce (the hook); otherwise the backend's gram is wrapped to compute and
    reduce one partial Gram per reduction class and add them.
    """
    cls = _dtensor_cls()
    if reduce_grams is not None:
        raise ValueError(
            "process_group is for plain tensors that are shards of one gradient; these gradients are DTensors, "
            "whose placements already say how to reduce them: leave process_group=None"
        )
    keys: list[Hashable | None] = []
    for i, g in enumerate(grads):
        entries = [(f"grads[{i}]", g)] + [(f"{lab}[{i}]", lst[i]) for lab, lst in zip(labels, refs)]
        is_dt = [isinstance(t, cls) for _, t in entries]
        if not any(is_dt):
            keys.append(None)
            continue
        if not all(is_dt):
            plain = entries[is_dt.index(False)][0]
            dt = entries[is_dt.index(True)][0]
            raise ValueError(
                f"{dt} is a DTensor but {plain} is a plain tensor: the tensors at one position must all be "
                f"DTensors with the same mesh and placements (capture references from the same sharded model)"
            )
        mesh, placements = g.device_mesh, tuple(g.placements)
        for label, t in entries[1:]:
            if t.device_mesh != mesh or tuple(t.placements) != placements:
                raise ValueError(
                    f"{label} is a DTensor on {t.device_mesh} with placements {tuple(t.placements)} but grads[{i}] "
                    f"is on {mesh} with placements {placements}: they must match"
                )
        keys.append(_reduction_key(mesh, placements, f"grads[{i}]"))

    local_grads = [_local(t) if isinstance(t, cls) else t for t in grads]
    local_refs = [[_local(t) if isinstance(t, cls) else t for t in lst] for lst in refs]

    classes: dict[Hashable | None, list[int]] = {}
    for i, key in enumerate(keys):  # insertion order = first position: the same on every rank
        classes.setdefault(key, []).append(i)
    if len(classes) == 1:
        (key,) = classes
        return local_grads, local_refs, (None if key is None else _key_reducer(key)), None

    plan = [(idx, None if key is None else _key_reducer(key)) for key, idx in classes.items()]

    def wrap(impl: Any) -> Any:
        def gram(vectors: list[list[torch.Tensor]], per_tensor: bool) -> torch.Tensor:
            m, n = len(vectors), len(vectors[0])
            device = vectors[0][0].device
            out = torch.zeros((n, m, m) if per_tensor else (m, m), dtype=torch.float64, device=device)
            for idx, reduce in plan:
                part = impl.gram([[lst[i] for i in idx] for lst in vectors], per_tensor)
                if reduce is not None:
                    part = reduce(part)
                if per_tensor:
                    out[torch.tensor(idx, device=device)] = part
                else:
                    out += part
            return out

        return dataclasses.replace(impl, gram=gram)

    return local_grads, local_refs, None, wrap


# --- project_model_ ---------------------------------------------------------------------------------

def _refuse_unsupported(params_obj: Any, params: list[torch.Tensor], accelerator: Any, process_group: Any) -> None:
    dtype = str(getattr(accelerator, "distributed_type", "")) if accelerator is not None else ""
    if dtype.upper().endswith("DEEPSPEED") or type(params_obj).__name__ == "DeepSpeedEngine" or any(
        hasattr(p, "ds_id") or hasattr(p, "ds_tensor") for p in params
    ):
        raise NotImplementedError(
            "DeepSpeed ZeRO is not supported: ZeRO keeps gradients in partitioned flat buffers owned by the engine, "
            "not in param.grad. The design (a local partial Gram over each rank's partition + one all-reduce) is "
            "in docs/distributed.md; use DDP or FSDP2 (fully_shard) meanwhile."
        )
    if (process_group is None and dtype.upper().endswith("FSDP") and not getattr(accelerator, "is_fsdp2", False)
            and not has_dtensor([p.grad for p in params if p.grad is not None], [])):
        raise ValueError(
            "accelerate FSDP1 keeps each rank's shard of the gradient in plain tensors: pass "
            "process_group=<the FSDP sharding group> so dot products are summed across shards, or use "
            "fsdp_version=2 (DTensor gradients: automatic). Under NO_SHARD the gradients are full: call "
            "atax_kernels.project_ on them directly"
        )
    if process_group is None and any(getattr(p, "_is_flat_param", False) for p in params):
        raise ValueError(
            "these are FSDP1 flat parameters, whose .grad holds only this rank's shard: pass "
            "process_group=<the FSDP sharding group> so dot products are summed across shards (or use FSDP2)"
        )


def _select_reference(reference: Any, keep: list[int], n: int) -> Any:
    """Restrict a reference given for all ``n`` params to the positions in ``keep``."""
    from .subspace import Subspace

    if isinstance(reference, Subspace):
        if len(reference.shapes) != n:
            raise ValueError(f"reference Subspace has {len(reference.shapes)} tensors but there are {n} parameters")
        if len(keep) == n:
            return reference
        if reference.rank == 0:
            return reference  # project_ explains the empty subspace
        # A basis restricted to some tensors is no longer orthonormal: solve with its Gram instead.
        return [[vec[i] for i in keep] for vec in reference.basis]
    if isinstance(reference, torch.Tensor):
        reference = [reference]
    if not isinstance(reference, (list, tuple)) or len(reference) == 0:
        raise TypeError(
            "reference must be a list of tensors parallel to params (captured capability gradients), a list of "
            f"such lists, a Subspace, or a callable returning a capability loss; got {type(reference).__name__}"
        )
    nested = all(isinstance(r, (list, tuple)) for r in reference)
    lists = [list(r) for r in reference] if nested else [list(reference)]
    out = []
    for j, lst in enumerate(lists):
        label = f"reference[{j}]" if nested else "reference"
        if len(lst) != n:
            raise ValueError(f"{label} has {len(lst)} tensors but there are {n} parameters")
        out.append([lst[i] for i in keep])
    return out if nested else out[0]


class _Stash:
    """Safety gradients set aside while the capability backward runs, and put back afterwards.

    Plain gradients move without a copy (``p.grad = None``; backward allocates fresh ones). A gradient that
    is a view of a bucket (DDP ``gradient_as_bucket_view``: ``g._base is not None``) must stay where it is,
    so it is cloned and zeroed; the projection is applied to the clone and copied back into the view.
    """

    def __init__(self, params: list[torch.Tensor]):
        self.entries: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
        with torch.no_grad():
            for p in params:
                g = p.grad
                if g is None:
                    self.entries.append((p, None, None))
                elif g._base is not None:
                    saved = g.clone()
                    g.zero_()
                    self.entries.append((p, saved, g))
                else:
                    p.grad = None
                    self.entries.append((p, g, None))

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Capability grads become references; the safety grads (or their clones) are put back."""
        grads, refs = [], []
        for p, saved, view in self.entries:
            cap = p.grad
            if saved is None:
                p.grad = None  # no safety gradient: leave the parameter out, as the safety step would
                continue
            if view is None:
                p.grad = saved
            grads.append(saved)
            refs.append(cap.detach() if cap is not None else torch.zeros_like(saved))
        return grads, refs

    def finish(self) -> None:
        """Copy (projected) clones back into their bucket views."""
        with torch.no_grad():
            for p, saved, view in self.entries:
                if view is not None:
                    view.copy_(saved)
                    p.grad = view
        self.entries = []

    def abort(self) -> None:
        with torch.no_grad():
            for p, saved, view in self.entries:
                if view is not None:
                    view.copy_(saved)
                    p.grad = view
                else:
                    p.grad = saved
        self.entries = []


def project_model_(
    params: Iterable[torch.Tensor] | torch.nn.Module,
    reference: Any,
    *,
    accelerator: Any = None,
    mode: str = "orthogonal",
    strength: float = 1.0,
    granularity: str = "global",
    backend: str | None = None,
    process_group: Any = None,
) -> ProjectionStats:
    """Project the safety gradients held in ``p.grad`` away from a capability reference, in place.

    One call between the safety backward and gradient clipping of a plain PyTorch / accelerate loop::

        loss_safety.backward()                  # or accelerator.backward(loss_safety)
        stats = project_model_(model.parameters(), lambda: capability_loss(model, cap_batch))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(); optimizer.zero_grad()

    Args:
        params: parameters (or a module). Parameters whose ``.grad`` is None are left out.
        reference: the capability direction(s):

            * a list of tensors parallel to ``params`` (captured capability gradients; None entries count as
              zero), or a list of such lists (several references);
            * a :class:`~atax_kernels.Subspace` over ``params``;
            * a callable taking no argument and returning a capability loss. The safety gradients are set
              aside (without a copy; cloned only when they are views of a DDP bucket), the loss is
              back-propagated (through ``accelerator.backward`` when given, so its scaling and gradient
              synchronisation apply), the resulting gradients become the reference, and the safety
              gradients are put back before projecting. Costs one forward + backward.
        accelerator: an ``accelerate.Accelerator`` (used for the callable's backward only).
        mode, strength, granularity, backend: as in :func:`atax_kernels.project_`.
        process_group: only for plain-tensor gradients that are disjoint shards of one gradient (FSDP1 flat
            parameters, a manual or ZeRO-style partition): local Grams are summed over this group. Leave
            None under DDP (gradients are replicated: summing would multiply every dot by the world size)
            and under FSDP2/HSDP (DTensor placements already say how to reduce).

    Scaling: the projection is invariant to positive scalings of the gradient and of each reference
    (``c_j r_j`` scales with ``g`` only), so with a ``GradScaler`` both the safety and the capability
    backward may be scaled (even by different factors): project before ``scaler.unscale_``. A non-finite
    Gram (an overflowed scaled backward) leaves the gradients untouched and sets ``stats.skipped``.

    Distributed: a collective call: every rank must call it, with the same parameters. Every rank gets the
    same coefficients, skip decision and statistics.

    Returns:
        :class:`~atax_kernels.ProjectionStats` (the gradients are modified in place).
    """
    from .subspace import Subspace

    params_obj = params
    if isinstance(params, torch.nn.Module):
        param_list = list(params.parameters())
    elif isinstance(params, torch.Tensor):
        param_list = [params]
    else:
        param_list = list(params)
    for i, p in enumerate(param_list):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a parameter (torch.Tensor)")
    _refuse_unsupported(params_obj, param_list, accelerator, process_group)
    reduce = None if process_group is None else gram_all_reducer(process_group)

    if callable(reference) and not isinstance(reference, (Subspace, torch.Tensor, list, tuple)):
        stash = _Stash(param_list)
        try:
            with torch.enable_grad():
                loss = reference()
                if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                    raise TypeError("the reference callable must return a loss tensor attached to autograd")
                if accelerator is not None:
                    accelerator.backward(loss)
                else:
                    loss.backward()
            grads, refs = stash.take()
        except BaseException:
            stash.abort()
            raise
        try:
            return _project_impl(grads, refs, mode, strength, granularity, backend, reduce_grams=reduce)
        finally:
            stash.finish()

    keep = [i for i, p in enumerate(param_list) if p.grad is not None]
    grads = [param_list[i].grad for i in keep]
    refs = _select_reference(reference, keep, len(param_list))
    if not isinstance(refs, Subspace):  # None entries (no capability gradient there) count as zero
        nested = len(refs) > 0 and isinstance(refs[0], list)
        lists = refs if nested else [refs]
        lists = [[torch.zeros_like(g) if r is None else r for g, r in zip(grads, lst)] for lst in lists]
        refs = lists if nested else lists[0]
    return _project_impl(grads, refs, mode, strength, granularity, backend, reduce_grams=reduce)
