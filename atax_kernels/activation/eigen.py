"""The eigen-solutions behind the bases: how many leading eigenvectors hold a fraction ``energy`` of a second
moment (:func:`select_rank`, with the round-off floors), and the eigenvectors themselves (:func:`top_basis`: a
full ``eigh`` up to ``EIGH_MAX_DIM``, warm-started block subspace iteration above it)."""
from __future__ import annotations

import math

import torch

__all__ = ["EIGH_MAX_DIM", "EIGH_FLOAT64_MAX_DIM", "ROUND_OFF", "select_rank", "subspace_iteration", "top_basis"]

#: Above this input dimension the basis comes from warm-started subspace iteration, not a full eigh.
EIGH_MAX_DIM = 2048
#: Eigenvalues below this fraction of the largest are round-off of a moment summed from products of this dtype
#: (float32: a few eps of |X|^2), never counted as directions.
ROUND_OFF = {torch.float64: 1e-12, torch.float32: 1e-6}
#: Full eigh in float64 up to this input dimension, float32 above it (up to ``EIGH_MAX_DIM``).
EIGH_FLOAT64_MAX_DIM = 1024


def top_basis(m: torch.Tensor, prev: torch.Tensor | None, psd: bool, floor: float, *, energy: float,
              max_rank: int | None, eigh_max_dim: int = EIGH_MAX_DIM) -> torch.Tensor:
    """Orthonormal columns [d, k]: the leading eigenvectors of the symmetric ``m`` holding ``energy`` of its
    positive part (at most ``max_rank``), eigenvalues below ``floor`` of the largest not counted. A PSD ``m``
    larger than ``eigh_max_dim`` goes to :func:`subspace_iteration`, warm-started from ``prev``."""
    m = (m + m.t()) * 0.5
    d = m.shape[0]
    if energy == 0 or d == 0:
        return m.new_zeros((d, 0))
    if psd and d > eigh_max_dim:
        return subspace_iteration(m, energy, max_rank, prev)
    if d > EIGH_FLOAT64_MAX_DIM and m.dtype == torch.float64:
        # Measured (2-core EPYC, d = 1536): float64 eigh 0.38 s, float32 0.19 s, warm subspace iteration at
        # rank ~130 0.69 s; the kept vectors are stored in float32 (or narrower) anyway.
        w, v = torch.linalg.eigh(m.to(torch.float32))
        w, v = w.to(torch.float64), v.to(torch.float64)
        floor = max(floor, ROUND_OFF[torch.float32])
    else:
        w, v = torch.linalg.eigh(m)
    w, v = w.flip(0), v.flip(1)
    k = select_rank(w, energy, max_rank, floor)
    return v[:, :k].contiguous()


def select_rank(w: torch.Tensor, energy: float, max_rank: int | None, floor: float = 1e-12) -> int:
    """Fewest leading (descending) eigenvalues holding ``energy`` of the positive part. Eigenvalues below
    ``floor`` (1e-12 for float64 products, 1e-6 for float32) of the largest are round-off of a
    rank-deficient moment and never count."""
    if w.numel() == 0 or energy == 0:
        return 0
    top = float(w[0])
    if not top > 0:
        return 0
    pos = torch.where(w > top * floor, w, torch.zeros_like(w))
    n_pos = int((pos > 0).sum())
    c = torch.cumsum(pos, 0)
    k = int((c < energy * float(c[-1]) * (1 - 1e-12)).sum()) + 1
    k = min(k, n_pos)
    if max_rank is not None:
        k = min(k, max_rank)
    return k


def subspace_iteration(m: torch.Tensor, energy: float, max_rank: int | None, prev: torch.Tensor | None,
                        *, tol: float = 1e-7, max_iters: int = 100) -> torch.Tensor:
    """Top eigenvectors of the PSD ``m`` holding ``energy`` of its trace: block subspace iteration with
    Rayleigh-Ritz (one ``m @ Q`` per iteration), warm-started from ``prev``; the block (>= 2 r + 16 columns,
    so the kept vectors converge at rate lambda_b / lambda_r) grows until it holds the energy, and falls back
    to a full eigh once it would reach half of d. Converged when the kept Ritz pairs' residual
    ``|m q - w q|`` is below ``tol`` of the largest eigenvalue (the span's error is that over the gap)."""
    d = m.shape[0]
    trace = float(m.diagonal().sum())
    if not trace > 0:
        return m.new_zeros((d, 0))

    def full() -> torch.Tensor:
        w, v = torch.linalg.eigh(m)
        w, v = w.flip(0), v.flip(1)
        return v[:, :select_rank(w, energy, max_rank)].contiguous()

    gen = torch.Generator(device=m.device).manual_seed(d)  # the same start on every rank
    r0 = 0 if prev is None else prev.shape[1]
    b = max(64, 2 * r0 + 16)
    if 2 * b >= d:
        return full()
    q = torch.randn(d, b, generator=gen, dtype=m.dtype, device=m.device)
    if r0:
        q[:, :r0] = prev.to(m.dtype)
    q = torch.linalg.qr(q)[0]
    while True:
        k, last_k, kept, last_kept, held, last_held = 0, -1, 0.0, -1.0, 0.0, -1.0
        for _ in range(max_iters):
            z = m @ q
            t = q.t() @ z
            w, v = torch.linalg.eigh((t + t.t()) * 0.5)
            w, v = w.flip(0), v.flip(1)
            q, z = q @ v, z @ v
            top = float(w[0])
            if not top > 0:
                return m.new_zeros((d, 0))
            held = float(torch.where(w > top * 1e-12, w, torch.zeros_like(w)).sum())
            # energy against the exact trace: what the block misses counts as one more (last) eigenvalue
            k = min(b, select_rank(torch.cat([w, w.new_tensor([max(trace - held, 0.0)])]), energy, max_rank))
            if k == 0:
                return m.new_zeros((d, 0))
            kept = float(w[:k].sum())  # exactly the energy q[:, :k] holds (Rayleigh quotients)
            if k < b and k == last_k:
                res = float(torch.linalg.norm(z[:, :k] - q[:, :k] * w[:k])) / math.sqrt(k)
                # converged vectors, or a kept energy that no longer moves (a flat spectrum at the cut,
                # where which of the near-equal directions is kept does not matter)
                if res <= tol * top or abs(kept - last_kept) <= 1e-9 * trace:
                    break
            if 2 * k + 16 > b and last_held >= 0 and held - last_held <= 1e-4 * trace:
                break  # the block is too small for the rank it needs to converge fast: grow it
            last_k, last_kept, last_held = k, kept, held
            q = torch.linalg.qr(z)[0]
        if 2 * k + 16 <= b or (max_rank is not None and k >= max_rank and k < b):
            return q[:, :k].contiguous()
        grow = max(2 * b, 2 * k + 16)
        if 4 * grow >= d:
            return full()  # a rank this large relative to d: the full eigh is cheaper
        extra = torch.randn(d, grow - b, generator=gen, dtype=m.dtype, device=m.device)
        q = torch.linalg.qr(torch.cat([q, extra], 1))[0]
        b = grow
