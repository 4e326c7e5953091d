"""``project_`` under ``torch.compile``: one opaque custom op with a fake implementation."""
from __future__ import annotations

import torch

from .. import _validate as validate
from .core import project_impl
from .stats import ProjectionStats

__all__ = ["project_compiled"]

# --- torch.compile support ------------------------------------------------------------------------
# Dynamo cannot trace the validation (memory addresses) or the host-side solves, so under compilation
# project_ becomes one opaque custom op with a fake implementation: `torch.compile(fullgraph=True)` sees a
# single node that mutates the gradients, and the eager implementation runs inside it.

_STAT_FIELDS = ("dots", "cosines", "coefs", "removed_fraction", "projected", "skipped",
                "_nonfinite_grad", "_nonfinite_refs")


@torch.library.custom_op("atax_py::project_", mutates_args=("grads",))
def _project_op(
    grads: list[torch.Tensor], refs: list[torch.Tensor], k: int, projection_mode: str, strength: float,
    granularity: str, backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    n = len(grads)
    ref_lists = [list(refs[j * n:(j + 1) * n]) for j in range(k)]
    stats = project_impl(grads, ref_lists, projection_mode, strength, granularity, backend)
    device = grads[0].device if grads else torch.device("cpu")
    return tuple(getattr(stats, f).to(device).clone() for f in _STAT_FIELDS)  # type: ignore[return-value]


@_project_op.register_fake
def _project_op_fake(grads, refs, k, projection_mode, strength, granularity, backend):
    device = grads[0].device if grads else torch.device("cpu")
    f64 = dict(dtype=torch.float64, device=device)
    b = dict(dtype=torch.bool, device=device)
    coef_shape = (len(grads), k) if granularity == "tensor" else (k,)
    return (torch.empty(k, **f64), torch.empty(k, **f64), torch.empty(coef_shape, **f64), torch.empty((), **f64),
            torch.empty((), **b), torch.empty((), **b), torch.empty((), **b), torch.empty(k, **b))


def project_compiled(grads, refs, mode, strength, granularity, backend) -> ProjectionStats:
    grad_list = list(grads) if not isinstance(grads, torch.Tensor) else [grads]
    ref_lists = validate.normalize_refs(refs, "refs")
    flat = [t for lst in ref_lists for t in lst]
    out = _project_op(grad_list, flat, len(ref_lists), mode, float(strength), granularity, backend)
    return ProjectionStats(**dict(zip(_STAT_FIELDS, out)))
