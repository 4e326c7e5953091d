"""The Euclidean norm of a list of tensors, global under FSDP2/HSDP (DTensor shards all-reduced), so every rank
logs and decides from the same number."""
from __future__ import annotations

from typing import Any

import torch

from ..._dtensor import is_dtensor, local

__all__ = ["global_norm", "global_sq_norm"]


def _sum_sq(tensors: list[torch.Tensor], dtype: torch.dtype | None) -> torch.Tensor:
    """Sum of the tensors' squared norms in float64 (each norm taken in ``dtype``, default the tensor's)."""
    norms = torch._foreach_norm(tensors, 2, dtype=dtype) if dtype is not None else torch._foreach_norm(tensors)
    return torch.stack([n.to(torch.float64) ** 2 for n in norms]).sum()


def global_sq_norm(tensors: list[torch.Tensor], *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Squared Euclidean norm of a tensor list (float64 tensor, no host sync). DTensors (FSDP2/HSDP) are reduced
    over the mesh dimensions they are sharded (or partial) on, one all-reduce per (mesh, placements) group.
    ``dtype``: compute each tensor's norm in it (``torch.float32``: a half-precision norm cannot overflow)."""
    plain = [t for t in tensors if not is_dtensor(t)]
    total = torch.zeros((), dtype=torch.float64, device=tensors[0].device if tensors else "cpu")
    if plain:
        total = total.to(plain[0].device) + _sum_sq(plain, dtype)
    groups: dict[Any, list[torch.Tensor]] = {}
    for t in tensors:
        if is_dtensor(t):
            groups.setdefault((id(t.device_mesh), tuple(t.placements)), []).append(t)
    for ts in groups.values():
        mesh, placements = ts[0].device_mesh, ts[0].placements
        sq = _sum_sq([local(t) for t in ts], dtype)
        import torch.distributed as dist
        for dim, pl in enumerate(placements):
            if not pl.is_replicate():
                dist.all_reduce(sq, group=mesh.get_group(dim))
        total = total.to(sq.device) + sq
    return total


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm of a tensor list (float64 tensor, no host sync), global over DTensor shards."""
    return global_sq_norm(tensors).sqrt()
