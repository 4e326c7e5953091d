"""Chunk / pointer tables for the Triton multi-tensor apply.

A *table* describes how the n tensors of one call are cut into fixed-size chunks:

* ``chunks``: int64 ``[C, 3]`` -- per chunk ``(tensor index, start element, length)``; chunks of one
  tensor are consecutive, tensors appear in order, zero-size tensors own no chunk.
* ``segs``: int64 ``[n, 2]`` -- per tensor ``(first chunk, end chunk)`` (used by the segmented reduction).
* ``ptrs``: int64 ``[L * n]`` -- the address of tensor ``i`` of list ``l`` at ``l * n + i``: its ``data_ptr``,
  or, when the table is ``aligned``, its distance from the device's *anchor* in 16-byte units.
* ``dts``: int32 ``[L * n]`` -- dtype code (0 fp32, 1 fp16, 2 bf16) at the same place.

The chunk size is fixed (``CHUNK``) and independent of the kernels' BLOCK sizes, so the reduction order and
hence the bits of every result depend only on the shapes. Tables are cached in a small LRU keyed by
``(device, flat, [(data_ptr, numel, dtype) ...])`` so that a parameter list is described once.

When every list is a run of contiguous tensors laid back-to-back in one buffer (DDP bucket views, flat
gradient buffers) the caller may use the *flat* layout: one pseudo tensor per list covering the whole
buffer; kernels then derive the chunk from the program id and never read the chunk table.

Why the anchor: Triton's alignment analysis cannot see through an int-to-pointer cast, so loads from a
``data_ptr`` read out of a table compile to scalar accesses. When every tensor of a call starts on a 16-byte
boundary (the usual case) the kernels instead address tensor ``i`` as ``anchor + q_i * (16 / itemsize)``: the
anchor is a kernel argument (which Triton specializes as 16-byte aligned) and the offset is visibly a multiple
of 16 bytes, so full blocks compile to 128-bit ``ld.global.v4`` / ``st.global.v4``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

CHUNK = 4096
ALIGN_BYTES = 16
_CACHE_SIZE = 32

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(dt: torch.dtype) -> int:
    return _DTYPE_CODE[dt]


@dataclass
class Table:
    n: int  # tensors per list (1 in the flat layout)
    aligned: bool  # every tensor starts on a 16-byte boundary: ptrs are anchor offsets, 128-bit load path
    n_chunks: int
    total: int  # elements per list
    flat: bool
    chunks: torch.Tensor
    segs: torch.Tensor
    ptrs: torch.Tensor
    dts: torch.Tensor
    bases: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the anchor viewed as fp32, fp16, bf16


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


_cache: "OrderedDict[tuple, Table]" = OrderedDict()


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


def get_table(lists: list[list[torch.Tensor]], flat: bool) -> Table:
    """Tables for ``lists`` (all contiguous, same shapes across lists). ``flat`` requires is_flat(lists)."""
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

    numels = [t.numel() for t in lists[0]]
    total = sum(numels)
    if flat:
        n = 1
        ptrs = [_flat_base(lst) for lst in lists]
        dts = [dtype_code(lst[0].dtype) for lst in lists]
        nch = -(-total // CHUNK)
        segs = [(0, nch)]
    else:
        n = len(numels)
        ptrs = [t.data_ptr() for lst in lists for t in lst]
        dts = [dtype_code(t.dtype) for lst in lists for t in lst]
        chunk_rows = []
        segs = []
        for i, ne in enumerate(numels):
            first = len(chunk_rows)
            for s in range(0, ne, CHUNK):
                chunk_rows.append((i, s, min(CHUNK, ne - s)))
            segs.append((first, len(chunk_rows)))
        nch = len(chunk_rows)
    aligned = all(p % ALIGN_BYTES == 0 for p in ptrs)
    base = anchor(device)
    if aligned:
        ptrs = [(p - base.data_ptr()) // ALIGN_BYTES for p in ptrs]
    if flat or nch == 0:
        chunks_t = torch.zeros((1, 3), dtype=torch.int64)
    else:
        chunks_t = torch.tensor(chunk_rows, dtype=torch.int64)
    tab = Table(
        n=n,
        aligned=aligned,
        n_chunks=nch,
        total=total,
        flat=flat,
        chunks=chunks_t.to(device),
        segs=torch.tensor(segs, dtype=torch.int64).reshape(-1, 2).to(device),
        ptrs=torch.tensor(ptrs, dtype=torch.int64).to(device),
        dts=torch.tensor(dts, dtype=torch.int32).to(device),
        bases=(base.view(torch.float32), base.view(torch.float16), base.view(torch.bfloat16)),
    )
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
def chunk_bounds(chunks_ptr, pid, total, CHUNK: tl.constexpr, FLAT: tl.constexpr):
    """(tensor index, first element, length) of chunk ``pid``: from the program id over one flat buffer, or
    from the chunk table."""
    if FLAT:
        tidx = pid * 0
        start = pid * CHUNK
        length = tl.minimum(total - start, CHUNK)
    else:
        tidx = tl.load(chunks_ptr + pid * 3)
        # chunks start at multiples of CHUNK inside their tensor; the round trip tells the compiler so
        start = tl.load(chunks_ptr + pid * 3 + 1) // CHUNK * CHUNK
        length = tl.load(chunks_ptr + pid * 3 + 2)
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
