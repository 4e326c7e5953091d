"""atax_triton::gram -- Gram matrix of m vectors given as lists of tensors, one launch per pass.

Pass 1 (``atax_gram_chunk_kernel``): one program per fixed-size chunk (see ``_table.CHUNK``). Each row j of the
chunk (vector j; its own base address and dtype, read from the pointer / dtype tables, so mixed dtypes need
no extra launch) is upcast to fp32 right after the load, and the chunk's float64 partial ``[m, m]`` is
written. Products in fp32:
* m <= 8: element-wise. Rows are split in a block A of up to 4 rows and a block B of the rest; the kernel
  accumulates the outer products A*A, A*B and B*B per lane (21 products per element for m = 5, 4 for m = 2,
  instead of the 256 scalar FMAs of a 16-row ``tl.dot`` under ``input_precision="ieee"``) and sums the lanes
  once per chunk.
* m > 8: ``tl.dot(X, X^T, input_precision="ieee")`` on the ``[MP, BLOCK]`` tile (true fp32 products, no TF32).
Pass 2 (``atax_seg_reduce_kernel``, twice): level 1 sums fixed ranges of at most ``_table.SPAN`` chunk partials
(many programs), level 2 sums each segment's level-1 sums in order. Segment = one tensor (per_tensor) or all
chunks (global). Fixed ranges, fixed order, no atomics: the bits depend only on the shapes.
Aligned tensors (16-byte boundary in every list, decided tensor by tensor) load their full ``BLOCK``-column
tiles without a column mask from anchor-relative addresses (see ``_table``), i.e. as 128-bit loads; the
others, and every chunk's partial tile, take the masked path, which visits elements in the same order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _table

_R = 64  # partial rows per tile in the segmented reduction
_COLS = 64  # partial entries per program in the segmented reduction
SMALL_M = 8  # up to this many vectors: element-wise products; above: tl.dot


@triton.jit
def _load_rows(p32, p16, pbf, col, m32, m16, mbf):
    # rows of other dtypes are fully masked off: their loads move no memory
    x32 = tl.load(p32[:, None] + col, mask=m32, other=0.0)
    x16 = tl.load(p16[:, None] + col, mask=m16, other=0.0).to(tl.float32)
    xbf = tl.load(pbf[:, None] + col, mask=mbf, other=0.0).to(tl.float32)
    return tl.where(m32, x32, tl.where(m16, x16, xbf))


@triton.jit
def _row_ptrs(ptrs_ptr, qs_ptr, dts_ptr, rows, rmask, n, tidx, base32, base16, basebf, ALIGNED: tl.constexpr):
    slot = rows.to(tl.int64) * n + tidx
    if ALIGNED:
        entry = tl.load(qs_ptr + slot, mask=rmask, other=0)
    else:
        entry = tl.load(ptrs_ptr + slot, mask=rmask, other=0)
    dt = tl.load(dts_ptr + slot, mask=rmask, other=-1)
    p32 = _table.typed_ptr(entry, base32, ALIGNED)
    p16 = _table.typed_ptr(entry, base16, ALIGNED)
    pbf = _table.typed_ptr(entry, basebf, ALIGNED)
    # per-row masks, constant along a row: full blocks stay vectorizable
    return p32, p16, pbf, (rmask & (dt == 0))[:, None], (rmask & (dt == 1))[:, None], (rmask & (dt == 2))[:, None]


@triton.jit
def _chunk_small(ptrs_ptr, qs_ptr, dts_ptr, n, tidx, start, length, base32, base16, basebf,
                 M: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
                 ALIGNED: tl.constexpr):
    ra = tl.arange(0, MA)
    a32, a16, abf, am32, am16, ambf = _row_ptrs(ptrs_ptr, qs_ptr, dts_ptr, ra, ra < M, n, tidx,
                                                base32, base16, basebf, ALIGNED)
    rb = MA + tl.arange(0, MB)
    b32, b16, bbf, bm32, bm16, bmbf = _row_ptrs(ptrs_ptr, qs_ptr, dts_ptr, rb, rb < M, n, tidx,
                                                base32, base16, basebf, ALIGNED)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    aa = tl.zeros([MA, MA, BLOCK], dtype=tl.float32)
    ab = tl.zeros([MA, MB, BLOCK], dtype=tl.float32)
    bb = tl.zeros([MB, MB, BLOCK], dtype=tl.float32)
    n_full = length // BLOCK
    if ALIGNED:  # full blocks without a column mask (128-bit loads), then the masked tail
        for blk in range(0, n_full):
            col = (start + blk * BLOCK + lane)[None, :]
            xa = _load_rows(a32, a16, abf, col, am32, am16, ambf)
            aa += xa[:, None, :] * xa[None, :, :]
            if HAS_B:
                xb = _load_rows(b32, b16, bbf, col, bm32, bm16, bmbf)
                ab += xa[:, None, :] * xb[None, :, :]
                bb += xb[:, None, :] * xb[None, :, :]
    else:
        n_full = 0
    for off in range(n_full * BLOCK, length, BLOCK):
        idx = off + lane
        inside = (idx < length)[None, :]
        col = (start + idx)[None, :]
        xa = _load_rows(a32, a16, abf, col, am32 & inside, am16 & inside, ambf & inside)
        aa += xa[:, None, :] * xa[None, :, :]
        if HAS_B:
            xb = _load_rows(b32, b16, bbf, col, bm32 & inside, bm16 & inside, bmbf & inside)
            ab += xa[:, None, :] * xb[None, :, :]
            bb += xb[:, None, :] * xb[None, :, :]
    return tl.sum(aa, axis=2), tl.sum(ab, axis=2), tl.sum(bb, axis=2)


@triton.jit
def _chunk_dot(ptrs_ptr, qs_ptr, dts_ptr, n, tidx, start, length, base32, base16, basebf,
               M: tl.constexpr, MP: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    rows = tl.arange(0, MP)
    p32, p16, pbf, m32, m16, mbf = _row_ptrs(ptrs_ptr, qs_ptr, dts_ptr, rows, rows < M, n, tidx,
                                             base32, base16, basebf, ALIGNED)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros([MP, MP], dtype=tl.float32)
    n_full = length // BLOCK
    if ALIGNED:
        for blk in range(0, n_full):
            x = _load_rows(p32, p16, pbf, (start + blk * BLOCK + lane)[None, :], m32, m16, mbf)
            acc += tl.dot(x, tl.trans(x), input_precision="ieee")
    else:
        n_full = 0
    for off in range(n_full * BLOCK, length, BLOCK):
        idx = off + lane
        inside = (idx < length)[None, :]
        x = _load_rows(p32, p16, pbf, (start + idx)[None, :], m32 & inside, m16 & inside, mbf & inside)
        acc += tl.dot(x, tl.trans(x), input_precision="ieee")
    return acc


@triton.jit
def _store_block(part, blk, r0, c0, M: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    r = r0 + tl.arange(0, R).to(tl.int64)
    c = c0 + tl.arange(0, C).to(tl.int64)
    tl.store(part + r[:, None] * M + c[None, :], blk.to(tl.float64), mask=(r < M)[:, None] & (c < M)[None, :])


@triton.jit
def atax_gram_chunk_kernel(
    first_ptr, numels_ptr, ptrs_ptr, qs_ptr, dts_ptr, al_ptr, part_ptr, base32, base16, basebf, n, total,
    M: tl.constexpr, MP: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr, HAS_B: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, FLAT: tl.constexpr, VEC: tl.constexpr, STEPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tidx, start, length = _table.chunk_bounds(first_ptr, numels_ptr, pid, n, total, STEPS, CHUNK, FLAT)
    part = part_ptr + pid * (M * M)
    use_vec = 0
    if VEC:  # the 128-bit path exists only when some tensor of the call is aligned; then per tensor
        use_vec = tl.load(al_ptr + tidx)
    if M <= 8:
        if use_vec != 0:
            aa, ab, bb = _chunk_small(ptrs_ptr, qs_ptr, dts_ptr, n, tidx, start, length, base32, base16, basebf,
                                      M, MA, MB, HAS_B, BLOCK, True)
        else:
            aa, ab, bb = _chunk_small(ptrs_ptr, qs_ptr, dts_ptr, n, tidx, start, length, base32, base16, basebf,
                                      M, MA, MB, HAS_B, BLOCK, False)
        _store_block(part, aa, 0, 0, M, MA, MA)
        if HAS_B:
            _store_block(part, ab, 0, MA, M, MA, MB)
            _store_block(part, tl.trans(ab), MA, 0, M, MB, MA)
            _store_block(part, bb, MA, MA, M, MB, MB)
    else:
        if use_vec != 0:
            acc = _chunk_dot(ptrs_ptr, qs_ptr, dts_ptr, n, tidx, start, length, base32, base16, basebf,
                             M, MP, BLOCK, True)
        else:
            acc = _chunk_dot(ptrs_ptr, qs_ptr, dts_ptr, n, tidx, start, length, base32, base16, basebf,
                             M, MP, BLOCK, False)
        _store_block(part, acc, 0, 0, M, MP, MP)


@triton.jit
def atax_seg_reduce_kernel(part_ptr, segs_ptr, out_ptr, MM, R: tl.constexpr, COLS: tl.constexpr):
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


_launch_chunk = _table.launcher(atax_gram_chunk_kernel)
_launch_reduce = _table.launcher(atax_seg_reduce_kernel)
# the names before the kernels carried the "atax" prefix (compute-sanitizer filters on it)
_gram_chunk_kernel = atax_gram_chunk_kernel
_seg_reduce_kernel = atax_seg_reduce_kernel


def constexprs(m: int, flat: bool, vec: bool, steps: int = 1) -> dict:
    """Compile-time parameters of ``atax_gram_chunk_kernel`` for m vectors (also used by the PTX probe)."""
    mp = max(16, triton.next_power_of_2(m))
    if m <= SMALL_M:
        ma = triton.next_power_of_2(min(m, 4))
        mb = triton.next_power_of_2(m - 4) if m > 4 else 1  # a 1-row placeholder when there is no block B
        block = 1024 if ma <= 2 else (512 if m <= 4 else 256)
    else:
        ma, mb = 1, 1
        block = {16: 128, 32: 64}.get(mp, 32)
    return dict(M=m, MP=mp, MA=ma, MB=mb, HAS_B=m > 4, CHUNK=_table.CHUNK, BLOCK=block, FLAT=flat, VEC=vec,
                STEPS=1 if flat else steps)


def _gram_impl(vectors: list[torch.Tensor], m: int, per_tensor: bool) -> torch.Tensor:
    n = len(vectors) // m
    device = vectors[0].device
    lists = _table.storage_order([[vectors[j * n + i] for i in range(n)] for j in range(m)])
    flat = (not per_tensor) and _table.is_flat(lists)
    tab = _table.get_table(lists, flat)
    mm = m * m
    nseg = n if per_tensor else 1
    spans, segs = (tab.spans, tab.span_segs) if per_tensor else (tab.global_spans, tab.global_span_seg)
    n_spans = spans.shape[0]
    with _table.device_guard(device):
        partials = torch.empty((max(tab.n_chunks, 1), mm), dtype=torch.float64, device=device)
        level1 = torch.empty((max(n_spans, 1), mm), dtype=torch.float64, device=device)
        out = torch.empty((nseg, m, m), dtype=torch.float64, device=device)
        if tab.n_chunks > 0:
            _launch_chunk[(tab.n_chunks,)](
                tab.first, tab.numels, tab.ptrs, tab.qs, tab.dts, tab.al, partials, *tab.bases, tab.n, tab.total,
                **constexprs(m, flat, tab.any_aligned, tab.search_steps),
            )
        if n_spans > 0:
            _launch_reduce[(n_spans, triton.cdiv(mm, _COLS))](
                partials, spans, level1, mm, R=_R, COLS=_COLS,
            )
        _launch_reduce[(nseg, triton.cdiv(mm, _COLS))](
            level1, segs, out, mm, R=_R, COLS=_COLS,
        )
        # exact symmetry: mirror the upper triangle
        out = torch.triu(out) + torch.triu(out, 1).transpose(-1, -2)
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
