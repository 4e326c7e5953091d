"""Chunk / pointer tables for the Triton multi-tensor apply.

A *table* describes how the n tensors of one call (L lists of n tensors) are cut into fixed-size chunks,
in O(n) memory (never one row per chunk: Llama-70B shapes have ~17 M chunks):

* ``first``: int64 ``[n + 1]`` -- first chunk of each tensor (prefix sum of ``ceil(numel / CHUNK)``, then the
  total). A kernel finds its tensor by a binary search of its program id in ``first`` (``chunk_bounds``);
  zero-size tensors own no chunk.
* ``numels``: int64 ``[n]``.
* ``ptrs``: int64 ``[L * n]`` -- the address of tensor ``i`` of list ``l`` at ``l * n + i`` (``data_ptr``).
* ``qs``: int64 ``[L * n]`` -- the same address as the distance from the device's *anchor* in 16-byte units
  (meaningful where ``al`` is 1).
* ``dts``: int64 ``[L * n]`` -- dtype code (0 fp32, 1 fp16, 2 bf16).
* ``al``: int64 ``[n]`` -- 1 when tensor ``i`` starts on a 16-byte boundary in every list (its full blocks take
  the 128-bit path; the others the scalar path, tensor by tensor, not all-or-nothing per call).
* ``spans`` / ``span_segs``: the two-level reduction of the per-chunk partials. Level 1 sums fixed ranges of at
  most ``SPAN`` chunks that never cross a tensor (``spans`` ``[B, 2]``, chunk ranges); level 2 sums, per
  segment, its spans in order (``span_segs``: per tensor ``[n, 2]``, or one ``[1, 2]`` for the global Gram).
  Both levels: fixed ranges, fixed order, many programs -- deterministic and parallel.

All of it is built with numpy (no Python loop over chunks), packed into one host buffer (pinned for CUDA)
and uploaded with ONE non-blocking copy; the views into the device copy are what kernels read.

The chunk size is fixed (``CHUNK``) and independent of the kernels' BLOCK sizes, and the 128-bit and scalar
paths visit the elements of a chunk in the same order, so the reduction order and hence the bits of every
result depend only on the shapes (not on alignment). Tables are cached in a small LRU keyed by
``(device, flat, [(data_ptr, numel, dtype) ...])`` so that a parameter list is described once. A table built
while a CUDA graph is being captured is used but not cached: its upload is a captured copy that only runs
when the graph is replayed.

When every list is a run of contiguous tensors laid back-to-back in one buffer (DDP bucket views, flat
gradient buffers) the caller may use the *flat* layout: one pseudo tensor per list covering the whole
buffer; kernels then derive the chunk from the program id and never search.

Why the anchor: Triton's alignment analysis cannot see through an int-to-pointer cast, so loads from a
``data_ptr`` read out of a table compile to scalar accesses. For an aligned tensor the kernels instead
address it as ``anchor + q * (16 / itemsize)``: the anchor is a kernel argument (which Triton specializes as
16-byte aligned) and the offset is visibly a multiple of 16 bytes, so full blocks compile to 128-bit
``ld.global.v4`` / ``st.global.v4``.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

CHUNK = 4096
SPAN = 256  # chunks per level-1 reduction range (1 M elements)
ALIGN_BYTES = 16
_CACHE_SIZE = 32

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(dt: torch.dtype) -> int:
    return _DTYPE_CODE[dt]


@dataclass
class Table:
    n: int  # tensors per list (1 in the flat layout)
    aligned: bool  # every tensor starts on a 16-byte boundary
    any_aligned: bool  # some tensor does: the kernels compile their 128-bit path
    n_chunks: int
    total: int  # elements per list
    flat: bool
    search_steps: int  # binary-search iterations that find a chunk's tensor in ``first``
    first: torch.Tensor
    numels: torch.Tensor
    ptrs: torch.Tensor
    qs: torch.Tensor
    dts: torch.Tensor
    al: torch.Tensor
    spans: torch.Tensor  # [B, 2] level-1 chunk ranges (tensor by tensor)
    span_segs: torch.Tensor  # [n, 2] level-2 span ranges per tensor
    global_spans: torch.Tensor  # [Bg, 2] level-1 ranges over all chunks (the global Gram)
    global_span_seg: torch.Tensor  # [1, 2] = [[0, Bg]]
    bases: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the anchor viewed as fp32, fp16, bf16
    host: torch.Tensor | None = None  # the (pinned) host buffer of the upload, kept alive with the table


_anchors: dict[str, torch.Tensor] = {}


def anchor(device: torch.device) -> torch.Tensor:
    """A small 16-byte aligned buffer per device that aligned tables address tensors relative to."""
    key = str(device)
    a = _anchors.get(key)
    if a is None:
        a = torch.zeros(ALIGN_BYTES, dtype=torch.uint8, device=device)
        if a.data_ptr() % ALIGN_BYTES:  # allocators align far more than this; never expected
            raise RuntimeError(f"atax triton: allocator returned an unaligned buffer on {device}")
        _anchors[key] = a
    return a


def launcher(kernel):
    """``torch.library.wrap_triton(kernel)`` (traceable inside a triton_op), or the kernel itself where this torch
    refuses it: torch 2.11 does not accept triton 3.6's interpreted kernels (TRITON_INTERPRET=1), 2.14 does."""
    try:
        return torch.library.wrap_triton(kernel)
    except RuntimeError:
        return kernel


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for CUDA tensors (launch on the tensors' GPU, not the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_cache: "OrderedDict[tuple, Table]" = OrderedDict()
# Tables built during a CUDA-graph capture: never looked up, kept alive for the process (the graph's copy
# and kernels read their buffers at every replay; freed memory could be reused inside the same capture).
_captured: list[Table] = []


def clear_cache() -> None:
    _cache.clear()


def _flat_base(lst: list[torch.Tensor]) -> int | None:
    """data_ptr of the buffer if ``lst`` is contiguous tensors back-to-back in order, else None."""
    dt = lst[0].dtype
    base = None
    nxt = None
    for t in lst:
        if t.dtype != dt or not t.is_contiguous():
            return None
        ne = t.numel()
        if ne == 0:
            continue
        p = t.data_ptr()
        if base is None:
            base = p
        elif p != nxt:
            return None
        nxt = p + ne * t.element_size()
    return base if base is not None else 0


def is_flat(lists: list[list[torch.Tensor]]) -> bool:
    return all(_flat_base(lst) is not None for lst in lists)


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``[data_ptr, data_ptr + numel * itemsize)`` in some order."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def storage_order(lists: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """The lists with tensor ``i`` replaced by a contiguous 1-D alias of its memory when it is dense and has
    the same strides in every list; otherwise by a contiguous copy (only those tensors are copied).

    Valid for element-wise work: the Gram sums over elements and combine_ is element-wise, so any order of
    the elements that is the same in every list gives the same sums; no copy is needed for transposed or
    permuted (dense) gradients."""
    n = len(lists[0])
    out = [list(lst) for lst in lists]
    for i in range(n):
        col = [lst[i] for lst in lists]
        if all(t.is_contiguous() for t in col):
            continue
        st = col[0].stride()
        if all(t.stride() == st for t in col) and all(is_dense(t) for t in col):
            for lst, t in zip(out, col):
                lst[i] = t.as_strided((t.numel(),), (1,))
        else:
            for lst, t in zip(out, col):
                lst[i] = t.contiguous()
    return out


def chunk_layout(numels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first [n + 1], spans [B, 2], span_segs [n, 2], global_spans [Bg, 2]) for tensors of ``numels``
    elements: vectorised, O(n + B) work and memory (B = chunks / SPAN), no per-chunk rows."""
    numels = np.asarray(numels, dtype=np.int64)
    n = numels.shape[0]
    cnt = -(-numels // CHUNK)
    first = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(cnt, out=first[1:])
    n_chunks = int(first[-1])
    # level 1, per tensor: ceil(cnt / SPAN) ranges of at most SPAN chunks inside each tensor
    scnt = -(-cnt // SPAN)
    sfirst = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(scnt, out=sfirst[1:])
    n_spans = int(sfirst[-1])
    owner = np.repeat(np.arange(n, dtype=np.int64), scnt)
    lo = first[owner] + (np.arange(n_spans, dtype=np.int64) - sfirst[owner]) * SPAN
    hi = np.minimum(lo + SPAN, first[owner + 1])
    spans = np.stack([lo, hi], axis=1) if n_spans else np.zeros((0, 2), dtype=np.int64)
    span_segs = np.stack([sfirst[:-1], sfirst[1:]], axis=1)
    # level 1 for the global Gram: fixed ranges over all chunks, ignoring tensor boundaries
    g_lo = np.arange(0, n_chunks, SPAN, dtype=np.int64)
    global_spans = np.stack([g_lo, np.minimum(g_lo + SPAN, n_chunks)], axis=1)
    return first, spans, span_segs, global_spans


def _build(device: torch.device, flat: bool, ptrs: list[int], dts: list[int], numels: list[int]) -> Table:
    n = len(numels)
    numels_a = np.asarray(numels, dtype=np.int64)
    total = int(numels_a.sum())
    ptrs_a = np.asarray(ptrs, dtype=np.int64) if ptrs else np.zeros(0, dtype=np.int64)
    lists = len(ptrs) // max(n, 1)
    if flat:
        nch = -(-total // CHUNK)
        first = np.array([0, nch], dtype=np.int64)
        g_lo = np.arange(0, nch, SPAN, dtype=np.int64)
        spans = np.stack([g_lo, np.minimum(g_lo + SPAN, nch)], axis=1)
        span_segs = np.array([[0, spans.shape[0]]], dtype=np.int64)
        global_spans = spans
    else:
        first, spans, span_segs, global_spans = chunk_layout(numels_a)
        nch = int(first[-1])
    base = anchor(device)
    ok = (ptrs_a % ALIGN_BYTES == 0).reshape(lists, n).all(axis=0) if n else np.zeros(0, dtype=bool)
    qs = np.where(np.tile(ok, lists), (ptrs_a - base.data_ptr()) // ALIGN_BYTES, 0)
    gseg = np.array([[0, global_spans.shape[0]]], dtype=np.int64)
    parts = [first, numels_a, ptrs_a, qs, np.asarray(dts, dtype=np.int64), ok.astype(np.int64),
             spans.reshape(-1), span_segs.reshape(-1), global_spans.reshape(-1), gseg.reshape(-1)]
    sizes = [p.size for p in parts]
    packed = np.concatenate(parts) if sum(sizes) else np.zeros(1, dtype=np.int64)
    host = torch.from_numpy(packed)
    if device.type == "cuda":  # pinned staging buffer, one asynchronous upload
        pinned = torch.empty(host.shape, dtype=torch.int64, pin_memory=True)
        pinned.copy_(host)
        host = pinned
        dev = host.to(device, non_blocking=True)
    else:
        dev = host if device.type == "cpu" else host.to(device)
    views, off = [], 0
    for sz in sizes:
        views.append(dev[off:off + sz])
        off += sz
    first_t, numels_t, ptrs_t, qs_t, dts_t, al_t, spans_t, segs_t, gspans_t, gseg_t = views
    return Table(
        n=n, aligned=bool(ok.all()) if n else True, any_aligned=bool(ok.any()), n_chunks=nch, total=total,
        flat=flat, search_steps=max(1, int(np.ceil(np.log2(max(n, 1)))) + 1),
        first=first_t, numels=numels_t, ptrs=ptrs_t, qs=qs_t, dts=dts_t, al=al_t,
        spans=spans_t.view(-1, 2), span_segs=segs_t.view(-1, 2),
        global_spans=gspans_t.view(-1, 2), global_span_seg=gseg_t.view(-1, 2),
        bases=(base.view(torch.float32), base.view(torch.float16), base.view(torch.bfloat16)),
        host=host if device.type == "cuda" else None,
    )


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def get_table(lists: list[list[torch.Tensor]], flat: bool) -> Table:
    """Tables for ``lists`` (contiguous, same shapes across lists). ``flat`` requires is_flat(lists)."""
    device = lists[0][0].device
    key = (
        str(device),
        flat,
        tuple((t.data_ptr(), t.numel(), t.dtype) for lst in lists for t in lst),
        len(lists[0]),
    )
    tab = _cache.get(key)
    if tab is not None:
        _cache.move_to_end(key)
        return tab
    if flat:
        numels = [sum(t.numel() for t in lists[0])]
        ptrs = [_flat_base(lst) for lst in lists]
        dts = [dtype_code(lst[0].dtype) for lst in lists]
    else:
        numels = [t.numel() for t in lists[0]]
        ptrs = [t.data_ptr() for lst in lists for t in lst]
        dts = [dtype_code(t.dtype) for lst in lists for t in lst]
    tab = _build(device, flat, ptrs, dts, numels)
    if _capturing(device):
        # the upload is a captured copy: an eager call before the first replay would read an unfilled
        # buffer, so such a table is never shared
        _captured.append(tab)
    else:
        _cache[key] = tab
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return tab


@triton.jit
def typed_ptr(entry, base, ALIGNED: tl.constexpr):
    """Pointer (typed like ``base``) of a ``ptrs`` table entry: ``base`` plus the entry's 16-byte units on the
    aligned path (so the compiler sees the alignment), else the raw address the entry holds."""
    if ALIGNED:
        p = base + entry * (128 // base.dtype.element_ty.primitive_bitwidth)
    else:
        p = entry.to(base.dtype)
    return p


@triton.jit
def chunk_bounds(first_ptr, numels_ptr, pid, n, total, STEPS: tl.constexpr, CHUNK: tl.constexpr,
                 FLAT: tl.constexpr):
    """(tensor index, first element, length) of chunk ``pid``: from the program id over one flat buffer, or
    by a binary search of ``pid`` in the chunk prefix ``first`` (the last tensor whose first chunk <= pid;
    zero-size tensors own no chunk, so they are never found)."""
    if FLAT:
        tidx = pid * 0
        start = pid * CHUNK
        length = tl.minimum(total - start, CHUNK)
    else:
        lo = pid * 0
        hi = lo + (n - 1)
        for _ in tl.static_range(STEPS):  # constexpr: ceil(log2 n) + 1 takes few values (1 for flat)
            mid = (lo + hi + 1) // 2
            # arithmetic select, not tl.where: triton 3.6's interpreter turns a scalar where into a 1-element
            # array that range() then rejects
            go = (tl.load(first_ptr + mid) <= pid).to(tl.int64)
            lo = lo + go * (mid - lo)
            hi = mid - 1 + go * (hi - mid + 1)
        tidx = lo
        # (chunk index inside its tensor) * CHUNK: visibly a multiple of CHUNK for the alignment analysis
        start = (pid - tl.load(first_ptr + tidx)) * CHUNK
        length = tl.minimum(tl.load(numels_ptr + tidx) - start, CHUNK)
    return tidx, start, length


def keep_opaque(op) -> None:
    """Keep a triton_op opaque under functionalization (AOTAutograd / torch.compile).

    The kernels address tensors through int64 pointer tables built from ``data_ptr()``, which cannot be
    traced; so instead of triton_op's default decomposition into the kernel call, the op stays a node
    (the same path torch uses when custom triton op decomposition is disabled for export)."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def _opaque(mode, func, types, args, kwargs):
        return mode.__torch_dispatch__(func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, _opaque)
