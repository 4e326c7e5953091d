"""Gram -> solve -> combine: the projection on resolved inputs (``project_`` validates and dispatches here; the
optimizer wrapper calls :func:`project_resolved` with its own knobs)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from .. import _validate as validate
from .. import distributed as _dist
from ..ops.registry import Backend, resolve
from .solve import coefs_one_reference, solve_coefs, split_gram
from .stats import DeferredStats, ProjectionStats, unprojected_stats

__all__ = ["MODES", "GRANULARITIES", "project_impl", "project_resolved"]

MODES = ("orthogonal", "conflict")
GRANULARITIES = ("global", "tensor")


def project_impl(
    grads: Any, refs: Any, mode: str, strength: float, granularity: str, backend: str | None,
    reduce_grams: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ProjectionStats:
    """``project_`` without the compile dispatch; ``reduce_grams`` sums local Grams across ranks."""
    grad_list = validate.as_tensor_list(grads, "grads")
    from ..references.subspace import Subspace

    # The no-solve shortcut needs a basis stored precisely enough to be orthonormal (not bf16/fp16).
    orthonormal = isinstance(refs, Subspace) and all(d in (torch.float32, torch.float64) for d in refs.dtypes)
    if isinstance(refs, Subspace):
        if refs.rank == 0 and grad_list:
            raise ValueError("refs is an empty Subspace (rank 0): add directions first")
        refs = refs.basis
    if not grad_list and isinstance(refs, (list, tuple)) and len(refs) == 0:
        # No gradients (a fully frozen model): nothing to project, so empty references are no error.
        ref_lists: list[list[torch.Tensor]] = []
    else:
        ref_lists = validate.normalize_refs(refs, "refs")
    mode = validate.check_choice(mode, "mode", MODES)
    granularity = validate.check_choice(granularity, "granularity", GRANULARITIES)
    alpha = validate.check_strength(strength)
    labels = [f"refs[{j}]" for j in range(len(ref_lists))] if len(ref_lists) > 1 else ["refs"]
    validate.check_parallel(grad_list, "grads", ref_lists, labels)
    wrap_impl = None
    if _dist.has_dtensor(grad_list, ref_lists):  # FSDP2/HSDP: shard-local tensors, globally reduced Gram
        grad_list, ref_lists, reduce_grams, wrap_impl = _dist.localize(grad_list, ref_lists, labels, reduce_grams)
    k, n = len(ref_lists), len(grad_list)
    if n == 0:
        return unprojected_stats(torch.device("cpu"), k)
    validate.check_no_overlap(grad_list, "grads", ref_lists, labels)
    device = grad_list[0].device
    dtypes = {t.dtype for lst in [grad_list, *ref_lists] for t in lst}
    impl = resolve(backend, device, dtypes)
    if wrap_impl is not None:
        impl = wrap_impl(impl)
    return project_resolved(impl, grad_list, ref_lists, mode, alpha, granularity,
                             orthonormal=orthonormal and granularity == "global", reduce_grams=reduce_grams)


def project_resolved(
    impl: Backend,
    grads: list[torch.Tensor],
    refs: list[list[torch.Tensor]],
    mode: str,
    alpha: float,
    granularity: str,
    *,
    orthonormal: bool = False,
    apply_to: list[torch.Tensor] | None = None,
    sign: float = 1.0,
    extra_coefs: torch.Tensor | None = None,
    reduce_grams: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ProjectionStats:
    """Gram -> solve -> combine. Internal knobs used by the optimizer wrapper:

    ``orthonormal``: the references are an orthonormal basis (G = I): no solve. ``apply_to``/``sign``:
    apply ``sign * coefs`` to other tensors than ``grads`` (update projection applies ``-c`` to the
    parameters). ``extra_coefs``: added to the solved coefficients in the same combine pass (PTX mixing);
    not counted in ``removed_fraction``. ``reduce_grams``: applied to the local Gram(s) right after the
    gram pass (e.g. an all-reduce over the ranks that hold disjoint shards), so every rank solves, skips
    and reports from the same global values.
    """
    per_tensor = granularity == "tensor"
    k = len(refs)
    grams = impl.gram([grads, *refs], per_tensor)
    if reduce_grams is not None:
        grams = reduce_grams(grams)
    target = grads if apply_to is None else apply_to
    if k == 1 and not orthonormal and extra_coefs is None:
        # The common case, on every backend: no host sync, a handful of ops, statistics on demand.
        coefs = coefs_one_reference(grams, mode, alpha)
        impl.combine_(target, refs, coefs * sign if sign != 1.0 else coefs)
        return DeferredStats(grams, coefs, per_tensor)
    all_finite = torch.isfinite(grams).all()

    can_sync = not impl.sync_free or k > 1
    if can_sync and not bool(all_finite):
        # Early exit on the host: nothing is written, a GradScaler still sees its inf where it was.
        coefs = torch.zeros((len(grads), k) if per_tensor else (k,), dtype=torch.float64, device=grams.device)
        return DeferredStats(grams, coefs, per_tensor)

    G, b, gg = split_gram(grams)
    if not can_sync:
        # Sync-free path (k = 1): zero the Gram where it is non-finite so the solve stays finite; the zero
        # coefficient then makes combine_ skip the reference entirely.
        G = torch.where(all_finite, G, torch.zeros_like(G))
        b = torch.where(all_finite, b, torch.zeros_like(b))
        gg = torch.where(all_finite, gg, torch.zeros_like(gg))
    if orthonormal:
        coefs = alpha * (b if mode == "orthogonal" else torch.clamp(b, max=0.0))
    else:
        # The vectors' length bounds rank(G) (k > n: tiny tensors, tensor granularity). Only for local Grams:
        # after reduce_grams the vectors are shards of a longer whole, whose length is not known here.
        max_rank = None
        if mode == "conflict" and k > 1 and reduce_grams is None:
            sizes = [t.numel() for t in grads]
            max_rank = sizes if per_tensor else [sum(sizes)]
        coefs = solve_coefs(G, b, gg, mode, alpha, max_rank=max_rank)
    if not can_sync:
        coefs = torch.where(all_finite, coefs, torch.zeros_like(coefs))
    applied = coefs if extra_coefs is None else coefs + extra_coefs.to(coefs)
    applied = applied * sign if sign != 1.0 else applied
    impl.combine_(target, refs, applied.contiguous())
    return DeferredStats(grams, coefs, per_tensor)
