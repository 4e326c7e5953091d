"""``remove_span_``: project weight updates off their protected input subspaces, in place.

For every target ΔW (d_out x d_in) with an orthonormal basis U (d_in x r): ΔW <- ΔW - (ΔW U) Uᵀ.
Then ΔW x = 0 for every x in span(U) (the activation-space projection, docs/DESIGN.md).

The public :func:`remove_span_` validates everything before it writes anything, then calls one backend:

* ``torch`` (this module, any device): per target two fp32 matmuls on slabs of rows, so the extra memory is
  one [rows, r] product (plus a [rows, d_in] fp32 copy for bf16/fp16 targets), never a d_in x d_in projector.
* ``cpu``: the C++ custom op ``atax::remove_span_`` (csrc/cpu/remove_span.cpp).
* ``triton``: ``atax_triton::remove_span_`` (ops/triton/remove_span.py).
* ``cuda``: no hand-written CUDA kernel; the torch path (cuBLAS) serves CUDA tensors under that name.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import _validate as V

__all__ = ["remove_span_", "remove_span_torch", "remove_span_cpp"]

NAME = "torch"
SLAB = 1 << 20  # elements of a [rows, d_in] slab in the torch path (4 MB fp32): bounded scratch


def _work_dtype(t: torch.Tensor, u: torch.Tensor) -> torch.dtype:
    # float64 only where the caller gave float64; every other mix computes in fp32 (the contract)
    return torch.float64 if torch.float64 in (t.dtype, u.dtype) else torch.float32


def _sq_sum(x: torch.Tensor) -> torch.Tensor:
    return torch.sum(x * x, dtype=torch.float64)


def remove_span_torch(targets: list[torch.Tensor], bases: list[torch.Tensor | None]) -> torch.Tensor:
    """The torch backend: validated inputs (see :func:`remove_span_`), returns float64 [n, 2] stats."""
    n = len(targets)
    device = targets[0].device if n else torch.device("cpu")
    stats = torch.zeros((n, 2), dtype=torch.float64, device=device)
    converted: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # shared bases are converted once
    for i, (t, u) in enumerate(zip(targets, bases)):
        d_out, d_in = t.shape
        if t.numel() == 0:
            continue
        r = 0 if u is None else u.shape[1]
        work = _work_dtype(t, u) if u is not None else (torch.float64 if t.dtype == torch.float64 else torch.float32)
        rows = max(1, min(d_out, SLAB // max(d_in, 1)))
        if r == 0:
            # nothing to remove; the norm still counts so that removed/before is a whole-model fraction
            for s in range(0, d_out, rows):
                stats[i, 0] += _sq_sum(t[s:s + rows].to(work))
            continue
        key = (id(u), work)
        if key not in converted:
            converted[key] = u.to(work).contiguous()
        uw = converted[key]
        ut = uw.t()
        in_place = t.dtype == work
        for s in range(0, d_out, rows):
            blk = t[s:s + rows]
            x = blk if in_place else blk.to(work)
            stats[i, 0] += _sq_sum(x)
            p = torch.mm(x, uw)  # [rows, r]: the only product-sized scratch
            stats[i, 1] += _sq_sum(p)
            x.addmm_(p, ut, alpha=-1.0)
            if not in_place:
                blk.copy_(x)
    return stats


_fake_done = False


def _cpp_present() -> bool:
    """True when the loaded extension has ``atax::remove_span_`` (its fake impl is registered on first call)."""
    global _fake_done
    try:
        torch.ops.atax.remove_span_  # noqa: B018
    except Exception:
        return False
    if not _fake_done:
        try:
            @torch.library.register_fake("atax::remove_span_")
            def _fake(targets, bases):
                return targets[0].new_empty((len(targets), 2), dtype=torch.float64)
        except RuntimeError:  # already registered (module reloaded)
            pass
        _fake_done = True
    return True


def remove_span_cpp(targets: list[torch.Tensor], bases: list[torch.Tensor | None]) -> torch.Tensor:
    """The ``cpu`` backend: the C++ op ``atax::remove_span_``."""
    return torch.ops.atax.remove_span_(list(targets), list(bases))


def _check_inputs(targets: Any, bases: Any) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    for name, value in (("targets", targets), ("bases", bases)):
        if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
            raise TypeError(f"{name} must be a sequence (list or tuple), got {type(value).__name__}")
    tl = list(targets)
    bl = list(bases)
    if len(tl) != len(bl):
        raise ValueError(f"targets has {len(tl)} tensors but bases has {len(bl)}; give one basis (or None) per target")
    for i, t in enumerate(tl):
        V.check_tensor(t, f"targets[{i}]")
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
        if u.dtype not in V.SUPPORTED_DTYPES:
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
    V.check_no_overlap(tl, "targets", [[empty if u is None else u for u in bl]], ["bases"])
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
    from .registry import resolve_remove_span

    dtypes = {t.dtype for t in tl} | {u.dtype for u in bl if u is not None}
    impl = resolve_remove_span(backend, tl[0].device, dtypes)
    return impl(tl, bl)
