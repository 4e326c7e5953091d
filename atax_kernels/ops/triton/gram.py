"""atax_triton::gram -- Gram matrix of m vectors given as lists of tensors, one launch per pass.

Pass 1 (``_gram_chunk_kernel``): one program per fixed-size chunk (see ``_table.CHUNK``). It loads the chunk
of all m vectors as an ``[MP, BLOCK]`` tile (row j = vector j; each row has its own base address and dtype,
read from the pointer / dtype tables, so mixed dtypes need no extra launch), upcasts to fp32 right after the
load, accumulates ``X @ X^T`` in fp32 (``input_precision="ieee"``: true fp32 products, no TF32) over the
chunk and writes the chunk's float64 partial ``[m, m]``.
Pass 2 (``_seg_reduce_kernel``): one program per (segment, column block) sums its segment's partials in a
fixed order (tiles of R chunks, ``tl.sum`` over each tile) in float64. Segment = one tensor (per_tensor)
or all chunks (global). No atomics: the bits depend only on the shapes.
When every tensor is 16-byte aligned, the full ``BLOCK``-column tiles of a chunk load without a column mask
from anchor-relative addresses (see ``_table``), i.e. as 128-bit loads; the chunk's partial tile is masked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _table

_R = 64  # chunks per tile in the segmented reduction
_COLS = 64  # partial entries per program in the segmented reduction


@triton.jit
def _gram_tile(p32, p16, pbf, col, m32, m16, mbf, acc):
    # rows of other dtypes are fully masked off: their loads move no memory
    x32 = tl.load(p32[:, None] + col, mask=m32, other=0.0)
    x16 = tl.load(p16[:, None] + col, mask=m16, other=0.0).to(tl.float32)
    xbf = tl.load(pbf[:, None] + col, mask=mbf, other=0.0).to(tl.float32)
    x = tl.where(m32, x32, tl.where(m16, x16, xbf))
    return acc + tl.dot(x, tl.trans(x), input_precision="ieee")


@triton.jit
def _gram_chunk_kernel(
    chunks_ptr, ptrs_ptr, dts_ptr, part_ptr, base32, base16, basebf, n, total,
    M: tl.constexpr, MP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, FLAT: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tidx, start, length = _table.chunk_bounds(chunks_ptr, pid, total, CHUNK, FLAT)
    rows = tl.arange(0, MP)
    rmask = rows < M
    slot = rows.to(tl.int64) * n + tidx
    entry = tl.load(ptrs_ptr + slot, mask=rmask, other=0)
    dt = tl.load(dts_ptr + slot, mask=rmask, other=-1)
    p32 = _table.typed_ptr(entry, base32, ALIGNED)
    p16 = _table.typed_ptr(entry, base16, ALIGNED)
    pbf = _table.typed_ptr(entry, basebf, ALIGNED)
    # per-row masks, constant along a row: full blocks stay vectorizable
    m32 = (rmask & (dt == 0))[:, None]
    m16 = (rmask & (dt == 1))[:, None]
    mbf = (rmask & (dt == 2))[:, None]
    lane = tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros([MP, MP], dtype=tl.float32)
    n_full = length // BLOCK
    if ALIGNED:  # full blocks without a column mask (128-bit loads), then the masked tail
        for b in range(0, n_full):
            col = (start + b * BLOCK + lane)[None, :]
            acc = _gram_tile(p32, p16, pbf, col, m32, m16, mbf, acc)
    else:
        n_full = 0
    for off in range(n_full * BLOCK, length, BLOCK):
        idx = off + lane
        inside = (idx < length)[None, :]
        acc = _gram_tile(p32, p16, pbf, (start + idx)[None, :], m32 & inside, m16 & inside, mbf & inside, acc)
    r = tl.arange(0, MP).to(tl.int64)
    out = part_ptr + pid * (M * M) + r[:, None] * M + r[None, :]
    tl.store(out, acc.to(tl.float64), mask=rmask[:, None] & rmask[None, :])


@triton.jit
def _seg_reduce_kernel(part_ptr, segs_ptr, out_ptr, MM, R: tl.constexpr, COLS: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1).to(tl.int64)
    c0 = tl.load(segs_ptr + s * 2)
    c1 = tl.load(segs_ptr + s * 2 + 1)
    cols = cb * COLS + tl.arange(0, COLS).to(tl.int64)
    cmask = cols < MM
    lane = tl.arange(0, R).to(tl.int64)
    acc = tl.zeros([COLS], dtype=tl.float64)
    for r0 in range(c0, c1, R):
        rows = r0 + lane
        tile = tl.load(part_ptr + rows[:, None] * MM + cols[None, :],
                       mask=(rows < c1)[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(out_ptr + s * MM + cols, acc, mask=cmask)


def _block_for(mp: int) -> int:
    return {16: 128, 32: 64}.get(mp, 32)


def _gram_impl(vectors: list[torch.Tensor], m: int, per_tensor: bool) -> torch.Tensor:
    n = len(vectors) // m
    device = vectors[0].device
    lists = [[vectors[j * n + i].contiguous() for i in range(n)] for j in range(m)]
    flat = (not per_tensor) and _table.is_flat(lists)
    tab = _table.get_table(lists, flat)
    mp = max(16, triton.next_power_of_2(m))
    partials = torch.empty((max(tab.n_chunks, 1), m, m), dtype=torch.float64, device=device)
    if tab.n_chunks > 0:
        torch.library.wrap_triton(_gram_chunk_kernel)[(tab.n_chunks,)](
            tab.chunks, tab.ptrs, tab.dts, partials, *tab.bases, tab.n, tab.total,
            M=m, MP=mp, CHUNK=_table.CHUNK, BLOCK=_block_for(mp), FLAT=flat, ALIGNED=tab.aligned,
        )
    nseg = n if per_tensor else 1
    segs = tab.segs if per_tensor else torch.tensor([[0, tab.n_chunks]], dtype=torch.int64, device=device)
    out = torch.empty((nseg, m, m), dtype=torch.float64, device=device)
    mm = m * m
    torch.library.wrap_triton(_seg_reduce_kernel)[(nseg, triton.cdiv(mm, _COLS))](
        partials, segs, out, mm, R=_R, COLS=_COLS,
    )
    # exact symmetry: mirror the upper triangle
    upper = torch.triu(out)
    out = upper + torch.triu(out, 1).transpose(-1, -2)
    return out if per_tensor else out[0]


@torch.library.triton_op("atax_triton::gram", mutates_args=())
def gram_op(vectors: list[torch.Tensor], m: int, per_tensor: bool) -> torch.Tensor:
    return _gram_impl(vectors, m, per_tensor)


@gram_op.register_fake
def _gram_fake(vectors: list[torch.Tensor], m: int, per_tensor: bool) -> torch.Tensor:
    n = len(vectors) // m
    shape = (n, m, m) if per_tensor else (m, m)
    return vectors[0].new_empty(shape, dtype=torch.float64)


_table.keep_opaque(gram_op)
