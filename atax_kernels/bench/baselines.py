"""Baselines the atax backends are measured against.

* ``seed_project_``: the seed reference (seeds/004, section 4, ``orthogonal_gradient_projection``) adapted to
  take gradient lists instead of a model. Same math: ``torch.cat`` both lists, ``torch.dot``, ``+ 1e-8`` on
  the squared norm, subtract, copy back tensor by tensor. For k > 1 the same style extended to a sequential
  (classical) Gram-Schmidt over the concatenated references.
* ``foreach_project_``: what a competent user writes with stock PyTorch ``torch._foreach_*`` ops, without
  flattening: per-tensor dots through ``torch._foreach_mul`` + per-tensor sums, a float64 solve of the k x k
  Gram system, then ``torch._foreach_add_`` per reference.

Both work in place on ``grads``. ``refs`` is a list of k lists (``refs[j][i]`` pairs with ``grads[i]``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["seed_project_", "foreach_project_"]


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    # The seed uses ``param.grad.view(-1)``; reshape keeps that for contiguous tensors and still works otherwise.
    return torch.cat([t.reshape(-1) for t in tensors])


def _copy_back(grads: Sequence[Tensor], flat: Tensor) -> None:
    idx = 0
    for g in grads:
        numel = g.numel()
        g.copy_(flat[idx : idx + numel].view_as(g))
        idx += numel


@torch.no_grad()
def seed_project_(grads: list[Tensor], refs: list[list[Tensor]]) -> None:
    """Seed reference, in place. k = 1 is the seed verbatim; k > 1 is sequential Gram-Schmidt, seed style."""
    k = len(refs)
    if k == 1:
        g_cap = _flat(refs[0])
        g_saf = _flat(grads)
        dot_product = torch.dot(g_saf, g_cap)
        norm_sq = torch.dot(g_cap, g_cap) + 1e-8  # Add epsilon for numerical stability
        projection = (dot_product / norm_sq) * g_cap
        g_saf_projected = g_saf - projection
        _copy_back(grads, g_saf_projected)
        return
    # k > 1: orthonormalise the references one after another (classical Gram-Schmidt, each flattened with
    # torch.cat), then remove the component of g along each basis vector in turn.
    basis: list[Tensor] = []
    for j in range(k):
        u = _flat(refs[j])
        for q in basis:
            u = u - torch.dot(u, q) * q
        norm_sq = torch.dot(u, u) + 1e-8
        basis.append(u / torch.sqrt(norm_sq))
    g_saf = _flat(grads)
    for q in basis:
        g_saf = g_saf - torch.dot(g_saf, q) * q
    _copy_back(grads, g_saf)


def _foreach_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """<a, b> over two tensor lists with stock foreach ops: one product per tensor, then per-tensor sums."""
    prods = torch._foreach_mul(a, b)
    total = torch.stack([p.sum(dtype=torch.float32) for p in prods]).sum(dtype=torch.float64)
    del prods
    return total


@torch.no_grad()
def foreach_project_(grads: list[Tensor], refs: list[list[Tensor]]) -> None:
    """Stock ``torch._foreach_*`` orthogonal projection, in place, no flattening."""
    k = len(refs)
    if k == 1:
        r = refs[0]
        dot = _foreach_dot(grads, r)
        norm_sq = torch.stack([n.float() for n in torch._foreach_norm(r)]).double().pow(2).sum()
        coef = (dot / (norm_sq + 1e-8)).item()
        torch._foreach_add_(grads, r, alpha=-coef)
        return
    # Gram of the references and their dots with g, one foreach pass per pair.
    G = torch.empty((k, k), dtype=torch.float64, device=grads[0].device)
    b = torch.empty((k,), dtype=torch.float64, device=grads[0].device)
    for i in range(k):
        b[i] = _foreach_dot(refs[i], grads)
        for j in range(i, k):
            G[i, j] = G[j, i] = _foreach_dot(refs[i], refs[j])
    lam = (torch.linalg.pinv(G, hermitian=True) @ b).tolist()
    for j in range(k):
        torch._foreach_add_(grads, refs[j], alpha=-lam[j])
