"""The tiny float64 solve between the two passes: Gram -> coefficients (pseudo-inverse with a relative cut-off,
the k = 1 closed forms, the cone NNLS for conflict mode with several references)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .._cone import CONE_RTOL, nonneg_quadratic_min_batch

__all__ = ["EIG_RTOL", "solve_coefs", "coefs_one_reference", "split_gram", "pinv_solve"]

#: Eigenvalues of G below this fraction of the largest are treated as zero. Gram entries carry fp32
#: product rounding (relative ~1e-7 of |r_i||r_j|), so directions weaker than this are noise, and
#: inverting them would inject O(|g|) garbage.
EIG_RTOL = 1e-5


def pinv_solve(G: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``G^+ b`` for symmetric PSD ``G`` (batched ``[..., k, k]``), cutting eigenvalues below EIG_RTOL·max."""
    w, Q = torch.linalg.eigh(G)
    top = w.amax(dim=-1, keepdim=True)
    keep = (w > EIG_RTOL * top) & (top > 0)
    inv = torch.where(keep, 1.0 / torch.where(keep, w, torch.ones_like(w)), torch.zeros_like(w))
    coords = (Q.transpose(-1, -2) @ b.unsqueeze(-1)).squeeze(-1)
    return (Q @ (inv * coords).unsqueeze(-1)).squeeze(-1)


def solve_coefs(
    G: torch.Tensor, b: torch.Tensor, gg: torch.Tensor, mode: str, strength: float,
    cone_rtol: float = CONE_RTOL, max_rank: Sequence[int] | None = None,
) -> torch.Tensor:
    """Coefficients ``c`` (``g' = g - R^T c``) for one or a batch of problems (leading dims of ``b``).

    ``cone_rtol``: conflicts smaller than this (a cosine) are left in place by the cone solve.
    ``max_rank``: per problem (flattened), the number of elements its vectors have, when known: with more
    references than that, the cone solve removes the Gram's null directions (see ``_cone``) and returns the
    minimum-norm coefficients, which may then have either sign.
    """
    k = b.shape[-1]
    if k == 1:
        denom = G[..., 0, :]  # [..., 1]
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        numer = b if mode == "orthogonal" else torch.clamp(b, max=0.0)
        return torch.where(denom > 0, strength * numer / safe, torch.zeros_like(b))
    # Solve in the scale-free coordinates of unit references (G -> D G D, b -> D b, c = D c_hat) so the
    # eigenvalue cut-off and the active-set tolerances do not depend on how references are scaled.
    diag = torch.diagonal(G, dim1=-2, dim2=-1)
    d = torch.where(diag > 0, 1.0 / torch.sqrt(torch.where(diag > 0, diag, torch.ones_like(diag))),
                    torch.zeros_like(diag))
    G_hat = G * d.unsqueeze(-1) * d.unsqueeze(-2)
    b_hat = b * d
    if mode == "orthogonal":
        return strength * d * pinv_solve(G_hat, b_hat)
    # One host copy for the whole batch (this is the sync k >= 2 needs); see _cone for the solve.
    Gh, bh, ggh = G_hat.cpu().numpy(), b_hat.cpu().numpy(), gg.cpu().numpy()
    ranks = None if max_rank is None else np.asarray(max_rank, dtype=np.int64).reshape(-1)
    mu = nonneg_quadratic_min_batch(Gh.reshape(-1, k, k), bh.reshape(-1, k), ggh.reshape(-1), cone_rtol, ranks)
    mu = mu.reshape(bh.shape)
    return -strength * d * torch.from_numpy(mu).to(b.device)


def split_gram(grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return grams[..., 1:, 1:], grams[..., 1:, 0], grams[..., 0, 0]


def coefs_one_reference(grams: torch.Tensor, mode: str, alpha: float) -> torch.Tensor:
    """Coefficients ``[1]`` (or ``[n, 1]``) for one reference, sync-free, in as few ops as the math allows.

    c = alpha * b / |r|^2 (conflict: min(b, 0)); 0 where |r|^2 = 0 or c overflows, and 0 everywhere when
    any Gram entry is non-finite (the combine pass then skips the reference, so nothing is written).
    Finiteness is tested as ``x * 0 != 0`` (true for inf and NaN) on ``c + sum(grams)``: one check covers
    the division by zero and every Gram entry. 9 ops (10 with alpha < 1); GPU habits: budget the op count.
    """
    row = grams.select(-2, 1)  # [..., 2] = (<g, r>, |r|^2)
    rr = row.narrow(-1, 1, 1)
    b = row.narrow(-1, 0, 1)
    if mode != "orthogonal":
        b = torch.clamp(b, max=0.0)
    c = b / rr if alpha == 1.0 else (b * alpha) / rr
    bad = ((c + grams.sum()) * 0.0) != 0.0
    return c.masked_fill(bad, 0.0)
