"""``project_``: remove from a gradient its component along reference directions, in place.

Every mode reduces to the two fused passes of :mod:`atax_kernels.ops`:

1. ``gram`` over ``[g, r_1 .. r_k]`` gives ``G = R R^T`` (k x k), ``b = R g`` and ``|g|^2``;
2. a tiny float64 solve on the tensors' device turns them into coefficients ``c``;
3. ``combine_`` applies ``g <- g - R^T c`` in place.

Modes (``alpha`` = strength):

* ``orthogonal``: ``c = alpha * G^+ b`` (pseudo-inverse with a relative eigenvalue cut-off, so
  dependent or zero references are harmless);
* ``conflict``: the closest ``g'`` with ``R g' >= 0``: ``c = -alpha * mu`` with
  ``mu = argmin_{mu >= 0} 1/2 mu^T G mu + mu^T b`` (PCGrad for k = 1, the cone projection for k > 1).

With one reference on a GPU kernel backend no value is read on the host, so a step is CUDA-graph
capturable; reading a :class:`ProjectionStats` field is then the only synchronisation.

Layout: ``solve`` (Gram -> coefficients), ``stats`` (ProjectionStats), ``core`` (gram -> solve -> combine),
``compile`` (the torch.compile custom op); this file holds the public ``project_``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .._cone import CONE_RTOL, nonneg_quadratic_min, nonneg_quadratic_min_batch  # noqa: F401 (re-exported)
from .compile import project_compiled
from .core import GRANULARITIES, MODES, project_impl, project_resolved
from .solve import EIG_RTOL, solve_coefs
from .stats import ProjectionStats, unprojected_stats

__all__ = ["project_", "ProjectionStats", "MODES", "GRANULARITIES", "EIG_RTOL", "CONE_RTOL", "project_impl",
           "project_resolved", "unprojected_stats"]

# names of the single-module era, kept for callers and tests
_project_impl = project_impl
_project_resolved = project_resolved
_solve_coefs = solve_coefs


def project_(
    grads: Sequence[torch.Tensor] | torch.Tensor,
    refs: Any,
    *,
    mode: str = "orthogonal",
    strength: float = 1.0,
    granularity: str = "global",
    backend: str | None = None,
) -> ProjectionStats:
    """Project ``grads`` in place away from (or out of conflict with) reference directions.

    Args:
        grads: gradient tensors (e.g. ``[p.grad for p in params]``), modified in place. A single tensor is
            accepted as a one-item list. Non-contiguous tensors, mixed dtypes and non-overlapping views of
            one flat buffer all work.
        refs: one reference direction (a tensor, or a sequence of tensors parallel to ``grads``), several
            (a sequence of such sequences), or a :class:`~atax_kernels.Subspace` (orthonormal: no solve).
        mode: ``"orthogonal"`` removes the span of the references; ``"conflict"`` removes only the part
            that conflicts (``R g' >= 0``; PCGrad for one reference, the cone projection for several).
        strength: alpha in [0, 1], the fraction of the computed component that is removed.
        granularity: ``"global"`` treats all tensors as one vector; ``"tensor"`` projects each tensor
            independently (layer-wise).
        backend: ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"``, or None for the fastest available
            (``ATAX_BACKEND`` overrides the default).

    Returns:
        :class:`ProjectionStats`. When any Gram entry is non-finite, every gradient is left bit-for-bit
        untouched and ``skipped`` is True (``reason`` says which side was non-finite).

    Raises:
        TypeError, ValueError: on bad input, before anything is modified.

    Distributed: DTensor gradients (FSDP2 ``fully_shard``, HSDP) are projected shard-locally with global
    dot products (one all-reduce of the Gram over the sharded mesh dimensions); see docs/distributed.md.
    """
    if torch.compiler.is_compiling():
        return project_compiled(grads, refs, mode, strength, granularity, backend)
    return project_impl(grads, refs, mode, strength, granularity, backend)
