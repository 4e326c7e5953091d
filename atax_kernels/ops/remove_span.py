"""``remove_span_``: project weight updates off their protected input subspaces, in place.

For every target ΔW (d_out x d_in) with an orthonormal basis U (d_in x r): ΔW <- ΔW - (ΔW U) Uᵀ.
Then ΔW x = 0 for every x in span(U) (the activation-space projection, docs/DESIGN.md).

The public :func:`remove_span_` validates everything before it writes anything, then calls one backend:

* ``torch`` (ops/remove_span_torch.py, any device): per target two fp32 matmuls on slabs of rows, so the extra memory is
  one [rows, r] product (plus a [rows, d_in] fp32 copy for bf16/fp16 targets), never a d_in x d_in projector.
* ``cpu``: the C++ custom op ``atax::remove_span_`` (csrc/cpu/remove_span.cpp).
* ``triton``: ``atax_triton::remove_span_`` (ops/triton/remove_span.py).
* ``cuda``: no hand-written CUDA kernel; the torch path (cuBLAS) serves CUDA tensors under that name.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import _validate as validate
from .cpp import remove_span_cpp, remove_span_present
from .registry import resolve_remove_span
from .remove_span_torch import remove_span_torch

# the backends live in their own modules (remove_span_torch, cpp, triton/remove_span); named here too
__all__ = ["remove_span_", "remove_span_torch", "remove_span_cpp", "remove_span_present"]


def _check_inputs(targets: Any, bases: Any) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    for name, value in (("targets", targets), ("bases", bases)):
        if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
            raise TypeError(f"{name} must be a sequence (list or tuple), got {type(value).__name__}")
    tl = list(targets)
    bl = list(bases)
    if len(tl) != len(bl):
        raise ValueError(f"targets has {len(tl)} tensors but bases has {len(bl)}; give one basis (or None) per target")
    for i, t in enumerate(tl):
        validate.check_tensor(t, f"targets[{i}]")
        if t.dim() != 2:
            raise ValueError(f"targets[{i}] has shape {tuple(t.shape)}; expected a 2-D [d_out, d_in] tensor")
    device = tl[0].device if tl else None
    for i, t in enumerate(tl):
        if t.device != device:
            raise ValueError(f"targets[{i}] is on {t.device} but targets[0] is on {device}")
    for i, (t, u) in enumerate(zip(tl, bl)):
        if u is None:
            continue
        if not isinstance(u, torch.Tensor):
            raise TypeError(f"bases[{i}] is a {type(u).__name__}, expected a torch.Tensor or None")
        if u.layout != torch.strided:
            raise TypeError(f"bases[{i}] is a sparse/non-strided tensor (layout {u.layout}); expected a dense tensor")
        if u.dtype not in validate.SUPPORTED_DTYPES:
            raise TypeError(
                f"bases[{i}] has dtype {u.dtype}; expected a floating dtype (float32, bfloat16, float16 or float64)"
            )
        if u.dim() != 2:
            raise ValueError(f"bases[{i}] has shape {tuple(u.shape)}; expected a 2-D [d_in, r] tensor")
        if u.shape[0] != t.shape[1]:
            raise ValueError(
                f"bases[{i}] has shape {tuple(u.shape)} but targets[{i}] has shape {tuple(t.shape)}: "
                f"the basis needs d_in = {t.shape[1]} rows"
            )
        if u.shape[1] > u.shape[0]:
            raise ValueError(
                f"bases[{i}] has shape {tuple(u.shape)}: r = {u.shape[1]} orthonormal columns cannot exceed d_in = "
                f"{u.shape[0]}"
            )
        if u.device != t.device:
            raise ValueError(f"bases[{i}] is on {u.device} but targets[{i}] is on {t.device}")
    empty = torch.empty(0)
    validate.check_no_overlap(tl, "targets", [[empty if u is None else u for u in bl]], ["bases"])
    return tl, bl


def remove_span_(
    targets: Sequence[torch.Tensor],
    bases: Sequence[torch.Tensor | None],
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """In place, for every target: ``ΔW <- ΔW - (ΔW U) Uᵀ``, one call for the whole model.

    Args:
        targets: 2-D float tensors ΔW [d_out, d_in] (float32/bfloat16/float16; float64 on the torch backend),
            updated in place; strided views (e.g. ``w.t()`` of a GPT-2 Conv1D weight) are fine. They must not
            overlap each other or any basis.
        bases: one per target: a [d_in, r] tensor with orthonormal columns (any float dtype, r may be 0), or
            None to leave that target unchanged. Several targets may pass the same basis tensor.
        backend: ``"torch"``, ``"cpu"``, ``"cuda"`` (served by the torch path: cuBLAS), ``"triton"`` or None
            for the fastest available (``ATAX_BACKEND`` overrides the default).

    Returns:
        float64 [len(targets), 2] on the targets' device: per target ``‖ΔW‖²`` before the call and
        ``‖ΔW U‖²``, the squared norm removed (targets with None or r = 0: (‖ΔW‖², 0)).

    Products are fp32 (bf16/fp16 upcast on load), results rounded once to ΔW's dtype. Every argument is
    checked before anything is written: a ValueError/TypeError leaves every target untouched.
    """
    tl, bl = _check_inputs(targets, bases)
    if not tl:
        return torch.zeros((0, 2), dtype=torch.float64)
    dtypes = {t.dtype for t in tl} | {u.dtype for u in bl if u is not None}
    impl = resolve_remove_span(backend, tl[0].device, dtypes)
    return impl(tl, bl)
