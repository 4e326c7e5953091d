"""The ``torch`` backend: pure PyTorch, multi-tensor, runs on any device.

No flattened copy of a whole gradient is ever made. ``gram`` streams each tensor through a reusable
float32 slab of at most ``m x SLICE`` elements (bounded extra memory) and reduces fixed-size blocks with
one batched matmul, so products are fp32 within a block of ``BLOCK`` elements and blocks are summed in
float64. ``combine_`` updates each tensor in place with ``add_``.
"""
from __future__ import annotations

import torch

BLOCK = 4096
SLICE = 1 << 20  # elements per slab row; multiple of BLOCK

NAME = "torch"


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)  # a view for contiguous tensors, a copy only for non-contiguous ones


def gram(vectors: list[list[torch.Tensor]], per_tensor: bool) -> torch.Tensor:
    """Gram matrix of the m concatenated vectors, or one per tensor position (see CONTRACT.md)."""
    m = len(vectors)
    n = len(vectors[0])
    device = vectors[0][0].device
    out = torch.zeros((n, m, m) if per_tensor else (m, m), dtype=torch.float64, device=device)
    sizes = [t.numel() for t in vectors[0]]
    biggest = max(sizes, default=0)
    if biggest == 0:
        return out
    slab_len = min(SLICE, -(-biggest // BLOCK) * BLOCK)
    slab = torch.empty((m, slab_len), dtype=torch.float32, device=device)
    for i, numel in enumerate(sizes):
        if numel == 0:
            continue
        flats = [_flat(vectors[j][i]) for j in range(m)]
        acc = out[i] if per_tensor else out
        for start in range(0, numel, slab_len):
            length = min(slab_len, numel - start)
            padded = -(-length // BLOCK) * BLOCK
            for j in range(m):
                slab[j, :length].copy_(flats[j][start:start + length])
            if padded != length:
                slab[:, length:padded].zero_()
            blocks = slab[:, :padded].view(m, padded // BLOCK, BLOCK).transpose(0, 1)
            partial = torch.bmm(blocks, blocks.transpose(1, 2))
            acc += partial.to(torch.float64).sum(0)
    # bmm(X, X^T) is not bitwise symmetric on every BLAS (oneDNN/AVX-512 kernels round the two triangles
    # differently); the contract promises exact symmetry, so mirror the upper triangle
    return torch.triu(out) + torch.triu(out, 1).transpose(-1, -2)


def combine_(target: list[torch.Tensor], vectors: list[list[torch.Tensor]], coefs: torch.Tensor) -> None:
    """``target[i] -= sum_j coefs[(i,) j] * vectors[j][i]`` in fp32, one rounding per tensor.

    Reads the coefficients on the host once (free on CPU; one sync on GPUs: the kernel backends avoid it).
    Terms with a zero coefficient are skipped, so a non-finite reference with a zeroed coefficient never
    reaches the gradient.
    """
    host = coefs.detach().to("cpu", torch.float64)
    per_tensor = host.dim() == 2
    k = len(vectors)
    for i, t in enumerate(target):
        row = host[i] if per_tensor else host
        active = [(j, float(row[j])) for j in range(k) if float(row[j]) != 0.0]
        if not active or t.numel() == 0:
            continue
        high = t.dtype in (torch.float32, torch.float64)
        if high:
            for j, c in active:
                v = vectors[j][i]
                t.add_(v.to(t.dtype) if v.dtype != t.dtype and t.dtype == torch.float64 else v, alpha=-c)
            continue
        # Low-precision target: accumulate in fp32 one slab at a time (bounded extra memory), round once.
        flat_t = t.view(-1) if t.is_contiguous() else None
        pieces = range(0, t.numel(), SLICE) if flat_t is not None else [None]
        flats = [_flat(vectors[j][i]) for j, _ in active] if flat_t is not None else []
        for start in pieces:
            if start is None:
                dst, srcs = t, [vectors[j][i] for j, _ in active]
            else:
                stop = min(start + SLICE, t.numel())
                dst = flat_t[start:stop]
                srcs = [f[start:stop] for f in flats]
            acc = dst.to(torch.float32)
            for (_, c), v in zip(active, srcs):
                acc.add_(v, alpha=-c)
            dst.copy_(acc)
