"""The implementations a projection benchmark runs side by side (the seed reference, stock foreach, every atax
backend), by display name, and the correctness check of a result against the seed's."""

from __future__ import annotations

import math
import sys
from typing import Callable, Sequence

import torch
from torch import Tensor

import atax_kernels

from .baselines import foreach_project_, seed_project_

SEED = "seed (torch.cat)"
FOREACH = "stock foreach"
FLOOR = "stream floor"

# Loose on purpose: the seed itself accumulates its fp32 dot over all N elements (~5e-4 relative at 124 M);
# a wrong kernel (no-op, wrong coefficient, wrong tensor) is off by O(1) on this data.
TOLERANCE = {"fp32": 1e-2, "bf16": 5e-2, "fp16": 3e-2}


def atax_name(backend: str) -> str:
    """The display name of an atax backend, ``atax[<backend>]``."""
    return f"atax[{backend}]"


def _atax_impl(backend: str, k: int) -> Callable[[list[Tensor], list[list[Tensor]]], None]:
    def run(grads: list[Tensor], refs: list[list[Tensor]]) -> None:
        atax_kernels.project_(
            grads, refs[0] if k == 1 else refs, mode="orthogonal", strength=1.0, granularity="global", backend=backend
        )

    return run


def default_backends(device: str) -> list[str]:
    """The available atax backends that run on ``device`` (``torch`` alone where the registry fails)."""
    try:
        bks = list(atax_kernels.available_backends())
    except Exception as exc:  # a half-landed registry must not stop the baselines from running
        print(f"warning: atax_kernels.available_backends() failed ({type(exc).__name__}: {exc}); "
              "benchmarking backend 'torch' only", file=sys.stderr)
        bks = ["torch"]
    dev = torch.device(device).type
    if dev == "cpu":
        return [b for b in bks if b not in ("cuda", "triton")]
    return [b for b in bks if b != "cpu"]


def implementations(backends: Sequence[str], k: int) -> dict[str, Callable]:
    """Display name -> in-place ``fn(grads, refs)``: the seed, stock foreach, then each atax backend."""
    impls: dict[str, Callable] = {SEED: seed_project_, FOREACH: foreach_project_}
    for b in backends:
        impls[atax_name(b)] = _atax_impl(b, k)
    return impls


def impl_by_name(name: str, k: int) -> Callable:
    """The implementation of one display name (as :func:`implementations` names them); KeyError otherwise."""
    if name == SEED:
        return seed_project_
    if name == FOREACH:
        return foreach_project_
    if name.startswith("atax[") and name.endswith("]"):
        return _atax_impl(name[5:-1], k)
    raise KeyError(name)


@torch.no_grad()
def rel_err(x: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    """||x - ref|| / ||ref|| over the whole list, accumulated in float64 tensor by tensor."""
    num = den = 0.0
    for a, b in zip(x, ref):
        bd = b.double()
        num += float((a.double() - bd).pow(2).sum())
        den += float(bd.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)
