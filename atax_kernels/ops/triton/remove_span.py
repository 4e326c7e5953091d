"""atax_triton::remove_span_ -- ΔW <- ΔW - (ΔW U) Uᵀ in place for every target, stats per target.

One launch per target (shapes differ; on a GPU that is ~5 us each, more than the data time of a small
model at small r: capture the step in a CUDA graph; one multi-tensor launch is not done yet), one program per block of
``BLOCK_M`` rows. Pass 1 walks the row block
in ``BLOCK_K`` column tiles: T += tl.dot(X_tile, U_tile) (T [BLOCK_M, R] stays in registers) and ‖X‖² is
summed. Pass 2 walks the same tiles again, X_tile - tl.dot(T, U_tileᵀ), and stores it in ΔW's dtype. So ΔW
is read from DRAM once (pass 2 re-reads the block the same program has just read, from L2) and written once;
no [d_out, r] product ever reaches memory. Products in fp32 (``input_precision="ieee"``: the contract says
fp32, not tf32); bf16/fp16 are upcast right after loading. Per-program norms go to a float64 partial table
summed in program order (deterministic, no atomics).

For r > ``MAX_RANK`` the T tile no longer fits in registers and the op is matmul-bound anyway: those targets
take the torch path (two cuBLAS GEMMs per row slab), which is the bar there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _table
from ..remove_span_torch import remove_span_torch

MAX_RANK = 128
BLOCK_M = 32
BLOCK_K = 32


@triton.jit
def _remove_span_kernel(
    w_ptr, u_ptr, part_ptr, d_out, d_in, r, s0, s1,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < d_out
    rk = tl.arange(0, R)
    kmask_r = rk < r
    t = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        cmask = cols < d_in
        m2 = rmask[:, None] & cmask[None, :]
        x = tl.load(w_ptr + rows[:, None] * s0 + cols[None, :] * s1, mask=m2, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + cols[:, None] * r + rk[None, :], mask=cmask[:, None] & kmask_r[None, :], other=0.0)
        t += tl.dot(x, u, input_precision="ieee")
        sq += x * x
    for k0 in range(0, d_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        cmask = cols < d_in
        m2 = rmask[:, None] & cmask[None, :]
        ptrs = w_ptr + rows[:, None] * s0 + cols[None, :] * s1
        x = tl.load(ptrs, mask=m2, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + cols[:, None] * r + rk[None, :], mask=cmask[:, None] & kmask_r[None, :], other=0.0)
        x = x - tl.dot(t, tl.trans(u), input_precision="ieee")
        tl.store(ptrs, x.to(w_ptr.dtype.element_ty), mask=m2)
    # fp32 per row, float64 across the program's rows (fixed order)
    before = tl.sum(tl.sum(sq, axis=1).to(tl.float64), axis=0)
    removed = tl.sum(tl.sum(t * t, axis=1).to(tl.float64), axis=0)
    tl.store(part_ptr + pid * 2, before)
    tl.store(part_ptr + pid * 2 + 1, removed)


def _rank_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _impl(targets: list[torch.Tensor], bases: list[torch.Tensor | None]) -> torch.Tensor:
    n = len(targets)
    device = targets[0].device
    converted: dict[int, torch.Tensor] = {}
    big_t, big_u, big_i = [], [], []
    launches = []
    for i, (w, u) in enumerate(zip(targets, bases)):
        r = 0 if u is None else u.shape[1]
        if w.numel() == 0:
            continue
        if r > MAX_RANK or r == 0:
            big_t.append(w)
            big_u.append(u)
            big_i.append(i)
            continue
        if id(u) not in converted:
            converted[id(u)] = u.to(torch.float32).contiguous()
        launches.append((i, w, converted[id(u)], r))
    # one zeroed [n, programs, 2] table of float64 partials, one reduction for every target (fixed order, no
    # atomics, no per-target reduction launches)
    progs = max((triton.cdiv(w.shape[0], BLOCK_M) for _, w, _, _ in launches), default=1)
    part = torch.zeros((n, progs, 2), dtype=torch.float64, device=device)
    with torch.cuda.device(device) if device.type == "cuda" else _nullctx():
        for i, w, u32, r in launches:
            d_out, d_in = w.shape
            _table.launcher(_remove_span_kernel)[(triton.cdiv(d_out, BLOCK_M),)](
                w, u32, part[i], d_out, d_in, r, w.stride(0), w.stride(1),
                R=_rank_pad(r), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
            )
    stats = part.sum(1)
    if big_t:
        # r > MAX_RANK: matmul-bound, cuBLAS through the torch path; r == 0: only the norm is read
        sub = remove_span_torch(big_t, big_u)
        for j, i in enumerate(big_i):
            stats[i] = sub[j]
    return stats


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.library.triton_op("atax_triton::remove_span_", mutates_args={"targets"})
def remove_span_op(targets: list[torch.Tensor], bases: list[torch.Tensor | None]) -> torch.Tensor:
    return _impl(targets, bases)


@remove_span_op.register_fake
def _remove_span_fake(targets: list[torch.Tensor], bases: list[torch.Tensor | None]) -> torch.Tensor:
    return targets[0].new_empty((len(targets), 2), dtype=torch.float64)


_table.keep_opaque(remove_span_op)


def remove_span_triton(targets: list[torch.Tensor], bases: list[torch.Tensor | None]) -> torch.Tensor:
    """The ``triton`` backend of :func:`atax_kernels.ops.remove_span_` (validated inputs)."""
    return torch.ops.atax_triton.remove_span_(list(targets), list(bases))
