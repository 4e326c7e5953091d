"""atax_triton::combine_ -- target[i] -= sum_j coefs[j] (or coefs[i, j]) * vectors[j][i], in place.

One launch for the whole list: one program per fixed-size chunk (multi-tensor apply over the chunk table;
or, for flat buffers with global coefficients, chunk = program id over the buffer). Per-tensor dtypes come
from the dtype table, so mixed dtypes (target or vectors) need no extra launch. Coefficients are read from
device memory (no host sync). A term whose coefficient is 0 is skipped by a scalar branch (its vector is not
read, so inf/NaN cannot leak); if all coefficients of a tensor are 0 the program stores nothing.
Arithmetic in fp32, one rounding to the target dtype.

Aligned path (decided tensor by tensor: tensor i starts on a 16-byte boundary in the target and every
vector list, the usual case): the full ``BLOCK``-sized blocks of a chunk are loaded and stored without a mask
from base addresses the compiler can prove 16-byte aligned (anchor-relative addressing, see ``_table``), so
they compile to 128-bit ``ld.global.v4`` / ``st.global.v4``; only the chunk's last partial block is masked
(the scalar tail). A misaligned tensor takes the masked path alone; the others keep the 128-bit path.
Dense non-contiguous tensors (transposed, permuted) with the same strides in every list are processed in
memory order without a copy; only other layouts are copied (and the target copied back).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _table

_BLOCK = 1024


@triton.jit
def _load_typed(ptr, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr, mask=mask, other=0.0)
    else:
        x = tl.load(ptr)
    return x


@triton.jit
def _load_f32(entry, dt, col, mask, base32, base16, basebf, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    # scalar dtype code -> one typed load, upcast right away
    x = tl.zeros(col.shape, dtype=tl.float32)
    if dt == 0:
        x = _load_typed(_table.typed_ptr(entry, base32, ALIGNED) + col, mask, MASKED)
    elif dt == 1:
        x = _load_typed(_table.typed_ptr(entry, base16, ALIGNED) + col, mask, MASKED).to(tl.float32)
    else:
        x = _load_typed(_table.typed_ptr(entry, basebf, ALIGNED) + col, mask, MASKED).to(tl.float32)
    return x


@triton.jit
def _combine_block(
    tentry, tdt, cbase, ptrs_ptr, dts_ptr, n, tidx, K, col, mask, base32, base16, basebf,
    ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):
    t = _load_f32(tentry, tdt, col, mask, base32, base16, basebf, ALIGNED, MASKED)
    s = tl.zeros(col.shape, dtype=tl.float32)
    for j in range(K):
        c = tl.load(cbase + j).to(tl.float32)
        if c != 0.0:
            slot = (j + 1) * n + tidx
            v = _load_f32(tl.load(ptrs_ptr + slot), tl.load(dts_ptr + slot), col, mask, base32, base16, basebf,
                          ALIGNED, MASKED)
            s += c * v
    r = t - s
    if not MASKED:
        mask = None
    if tdt == 0:
        tl.store(_table.typed_ptr(tentry, base32, ALIGNED) + col, r, mask=mask)
    elif tdt == 1:
        tl.store(_table.typed_ptr(tentry, base16, ALIGNED) + col, r.to(tl.float16), mask=mask)
    else:
        tl.store(_table.typed_ptr(tentry, basebf, ALIGNED) + col, r.to(tl.bfloat16), mask=mask)


@triton.jit
def _combine_chunk(ptrs_ptr, dts_ptr, cbase, n, tidx, K, start, length, base32, base16, basebf,
                   BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # ptrs_ptr: raw addresses (scalar path) or anchor offsets (ALIGNED) of list 0 = target, list j + 1 = vectors[j]
    tentry = tl.load(ptrs_ptr + tidx)
    tdt = tl.load(dts_ptr + tidx)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    n_full = length // BLOCK
    if ALIGNED:  # full blocks unmasked (128-bit accesses), then the masked tail
        for b in range(0, n_full):
            col = start + b * BLOCK + lane
            _combine_block(tentry, tdt, cbase, ptrs_ptr, dts_ptr, n, tidx, K, col, col,
                           base32, base16, basebf, ALIGNED, False)
    else:
        n_full = 0
    for off in range(n_full * BLOCK, length, BLOCK):
        idx = off + lane
        _combine_block(tentry, tdt, cbase, ptrs_ptr, dts_ptr, n, tidx, K, start + idx, idx < length,
                       base32, base16, basebf, ALIGNED, True)


@triton.jit
def atax_combine_kernel(
    first_ptr, numels_ptr, ptrs_ptr, qs_ptr, dts_ptr, al_ptr, coef_ptr, base32, base16, basebf, n, total,
    K, COEF_STRIDE, CHUNK: tl.constexpr, BLOCK: tl.constexpr, FLAT: tl.constexpr, VEC: tl.constexpr,
    STEPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tidx, start, length = _table.chunk_bounds(first_ptr, numels_ptr, pid, n, total, STEPS, CHUNK, FLAT)
    cbase = coef_ptr + tidx * COEF_STRIDE
    anynz = 0
    for j in range(K):
        c = tl.load(cbase + j).to(tl.float32)
        if c != 0.0:
            anynz = 1
    if anynz != 0:
        use_vec = 0
        if VEC:  # the 128-bit path exists only when some tensor of the call is aligned; then per tensor
            use_vec = tl.load(al_ptr + tidx)
        if use_vec != 0:
            _combine_chunk(qs_ptr, dts_ptr, cbase, n, tidx, K, start, length, base32, base16, basebf, BLOCK, True)
        else:
            _combine_chunk(ptrs_ptr, dts_ptr, cbase, n, tidx, K, start, length, base32, base16, basebf,
                           BLOCK, False)


_combine_kernel = atax_combine_kernel  # the name before the kernels carried the "atax" prefix
_launch = _table.launcher(atax_combine_kernel)


def constexprs(flat: bool, vec: bool, steps: int = 1) -> dict:
    """Compile-time parameters of ``atax_combine_kernel`` (also used by the PTX probe)."""
    return dict(CHUNK=_table.CHUNK, BLOCK=_BLOCK, FLAT=flat, VEC=vec, STEPS=1 if flat else steps)


def _combine_impl(target: list[torch.Tensor], vectors: list[torch.Tensor], coefs: torch.Tensor) -> None:
    n = len(target)
    k = len(vectors) // n
    lists = _table.storage_order([list(target)] + [[vectors[j * n + i] for i in range(n)] for j in range(k)])
    if coefs.dtype != torch.float64 or not coefs.is_contiguous():
        coefs = coefs.to(dtype=torch.float64).contiguous()
    per_tensor = coefs.dim() == 2
    flat = (not per_tensor) and _table.is_flat(lists)
    tab = _table.get_table(lists, flat)
    if tab.n_chunks > 0 and k > 0:
        with _table.device_guard(target[0].device):
            _launch[(tab.n_chunks,)](
                tab.first, tab.numels, tab.ptrs, tab.qs, tab.dts, tab.al, coefs, *tab.bases, tab.n, tab.total,
                k, k if per_tensor else 0, **constexprs(flat, tab.any_aligned, tab.search_steps),
            )
    for t, c in zip(target, lists[0]):
        if c.data_ptr() != t.data_ptr() and c.numel():  # a copy (not an alias of t's memory): write it back
            t.copy_(c.view(t.shape))


@torch.library.triton_op("atax_triton::combine_", mutates_args={"target"})
def combine_op(target: list[torch.Tensor], vectors: list[torch.Tensor], coefs: torch.Tensor) -> None:
    _combine_impl(target, vectors, coefs)


@combine_op.register_fake
def _combine_fake(target: list[torch.Tensor], vectors: list[torch.Tensor], coefs: torch.Tensor) -> None:
    return None


_table.keep_opaque(combine_op)
