"""The torch backend of ``remove_span_`` (any device; also what serves ``cuda`` and large r on ``triton``):
per target two fp32 matmuls on slabs of rows, so the extra memory is one [rows, r] product (plus a [rows, d_in]
fp32 copy for bf16/fp16 targets), never a d_in x d_in projector. Inputs arrive validated (ops/remove_span.py).
A leaf: every backend module may import it."""
from __future__ import annotations

import torch

__all__ = ["remove_span_torch", "NAME", "SLAB"]

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
