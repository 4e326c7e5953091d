"""An independent float64 oracle: flatten with torch.cat, solve with SVD / scipy NNLS.

Plain and obviously correct, deliberately sharing no code with the library.
"""
from __future__ import annotations

import numpy as np
import scipy.optimize
import torch

F64 = torch.float64


def flat64(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=F64)
    return torch.cat([t.detach().cpu().to(F64).reshape(-1) for t in tensors])


def gram(vectors: list[list[torch.Tensor]], per_tensor: bool = False) -> torch.Tensor:
    if per_tensor:
        n = len(vectors[0])
        return torch.stack([gram([[v[i]] for v in vectors]) for i in range(n)]) if n else torch.zeros(0, len(vectors), len(vectors), dtype=F64)
    X = torch.stack([flat64(v) for v in vectors])
    return X @ X.T


def _project_flat(g: torch.Tensor, R: torch.Tensor, mode: str, strength: float) -> torch.Tensor:
    if R.shape[1] == 0:
        return g.clone()
    if mode == "orthogonal":
        # The span does not depend on how rows are scaled: normalise so the rank cut-off is scale-free.
        norms = R.norm(dim=1, keepdim=True)
        R = torch.where(norms > 0, R / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(R))
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        keep = S > 1e-8 * S.max() if S.numel() and S.max() > 0 else torch.zeros_like(S, dtype=torch.bool)
        B = Vh[keep]
        return g - strength * (B.T @ (B @ g))
    mu, _ = scipy.optimize.nnls(R.T.numpy(), -g.numpy(), maxiter=1000)
    return g + strength * (R.T @ torch.from_numpy(mu))


def project(grads, refs, mode="orthogonal", strength=1.0, granularity="global") -> list[torch.Tensor]:
    """Projected gradients as float64 CPU tensors shaped like ``grads``."""
    if granularity == "tensor":
        out = []
        for i, g in enumerate(grads):
            R = torch.stack([r[i].detach().cpu().to(F64).reshape(-1) for r in refs])
            out.append(_project_flat(g.detach().cpu().to(F64).reshape(-1), R, mode, strength).view(g.shape))
        return out
    g = flat64(grads)
    R = torch.stack([flat64(r) for r in refs])
    flat = _project_flat(g, R, mode, strength)
    out, pos = [], 0
    for t in grads:
        out.append(flat[pos:pos + t.numel()].view(t.shape))
        pos += t.numel()
    return out


def seed_reference_project(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> list[torch.Tensor]:
    """The seed's orthogonal_gradient_projection math (k = 1, with its +1e-8), on gradient lists."""
    g = torch.cat([t.reshape(-1) for t in grads])
    c = torch.cat([t.reshape(-1) for t in ref])
    proj = (torch.dot(g, c) / (torch.dot(c, c) + 1e-8)) * c
    flat = g - proj
    out, pos = [], 0
    for t in grads:
        out.append(flat[pos:pos + t.numel()].view_as(t))
        pos += t.numel()
    return out
