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

:func:`atax_kernels.project_model_` (plain.py) is the one-call entry point for plain PyTorch / accelerate loops;
this module only knows how to reduce: it imports nothing above the DTensor leaf.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable

import torch

from ._dtensor import dtensor_cls, local

__all__ = ["gram_all_reducer", "has_dtensor", "localize", "local_backend", "global_sq_norm"]


# --- DTensor plumbing used by project_ -------------------------------------------------------------

def has_dtensor(grads: list[torch.Tensor], refs: list[list[torch.Tensor]]) -> bool:
    """True when any gradient or reference tensor is a DTensor."""
    cls = dtensor_cls()
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
    cls = dtensor_cls()
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

    local_grads = [local(t) for t in grads]
    local_refs = [[local(t) for t in lst] for lst in refs]

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


# --- the same reductions for callers that run the passes themselves (ProjectedOptimizer) -------------

def local_backend(
    backend: str | None, vectors: list[torch.Tensor], ref_lists: list[list[torch.Tensor]],
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], Any, Callable | None]:
    """(local vectors, local refs, resolved backend, reduce_grams). Plain tensors pass through; DTensors
    (FSDP2/HSDP) become their local shards, and the Gram is all-reduced over the shard mesh dims (as in
    ``project_``)."""
    from .ops.registry import resolve

    reduce_grams = wrap = None
    if has_dtensor(vectors, ref_lists):
        labels = [f"references[{j}]" for j in range(len(ref_lists))]
        vectors, ref_lists, reduce_grams, wrap = localize(vectors, ref_lists, labels, None)
    dtypes = {t.dtype for lst in [vectors, *ref_lists] for t in lst}
    impl = resolve(backend, vectors[0].device, dtypes)
    if wrap is not None:
        impl = wrap(impl)
    return vectors, ref_lists, impl, reduce_grams


def global_sq_norm(tensors: list[torch.Tensor], backend: str | None = None) -> float:
    """|v|^2 of a tensor list; for DTensors (FSDP2) the global one (local Gram all-reduced over the shard mesh
    dims), so every rank takes the same decision from it (a rank may hold only empty shards)."""
    if not has_dtensor(tensors, []):
        from .ops import gram

        return float(gram([tensors], backend=backend)[0, 0])
    local_vectors, _, impl, reduce_grams = local_backend(backend, tensors, [])
    grams = impl.gram([local_vectors], False)
    if reduce_grams is not None:
        grams = reduce_grams(grams)
    return float(grams[0, 0])
