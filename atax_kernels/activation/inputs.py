"""The records an ``ActivationSubspace`` keeps: one per protected module (:class:`ProtectedModule`) and one per
distinct input the modules read (:class:`DistinctInput`: its second moments, token counts and basis)."""
from __future__ import annotations

import torch
from torch import nn

from .eigen import ROUND_OFF
from .settings import SIDES

__all__ = ["DistinctInput", "ProtectedModule"]


class DistinctInput:
    """One distinct input: its accumulators, token counts and basis (shared by the modules that read it).

    ``acc``/``count`` hold what was observed since the last ``update()`` per side, ``stage``/``stage_count``
    the forward in progress (folded in only if finite), ``ema`` the averaged normalised moments of
    ``update(decay>0)``; ``pending`` counts, per member, the forwards in which another member received the
    shared tensor and this one has not yet."""

    def __init__(self, d_in: int, device: torch.device) -> None:
        self.d_in, self.device = d_in, device
        self.members: list[str] = []
        self.acc: dict[str, torch.Tensor | None] = {s: None for s in SIDES}
        self.count: dict[str, float] = {s: 0.0 for s in SIDES}
        self.stage: dict[str, torch.Tensor | None] = {s: None for s in SIDES}
        self.stage_count: dict[str, float] = {s: 0.0 for s in SIDES}
        self.ema: dict[str, torch.Tensor | None] = {s: None for s in SIDES}
        self.basis: torch.Tensor | None = None
        self.moment: torch.Tensor | None = None  # the matrix the last basis came from (for LoRA B), transient
        self.held: float | None = None  # the fraction of that (PSD) matrix's trace the basis holds
        self.n_accum = 0
        # relative eigenvalue floor below which directions are round-off: float32 products leave ~1e-7 noise
        self.floor = ROUND_OFF[torch.float64]
        self.pending: dict[str, int] = {}


class ProtectedModule:
    """One protected module: its name, kind (``"linear"``, ``"conv1d"``, ``"lora"``, ``"embedding"``), input
    dimension and the input it reads; an embedding keeps token counts and its protected tokens instead."""

    def __init__(self, name: str, module: nn.Module, kind: str) -> None:
        self.name, self.module, self.kind = name, module, kind
        self.group: DistinctInput | None = None
        # ZeRO-3 leaves a placeholder weight and keeps the real shape in ds_shape
        shape = tuple(getattr(module.weight, "ds_shape", None) or module.weight.shape) if kind != "lora" else ()
        if kind == "linear":
            self.d_in = shape[1]
        elif kind == "conv1d":
            self.d_in = shape[0]
        elif kind == "lora":
            self.d_in = next(iter(module.lora_A.values())).in_features
        else:  # embedding
            self.d_in = module.num_embeddings
            self.counts = {s: None for s in SIDES}
            self.stage_counts = {s: None for s in SIDES}
            self.ema_counts = {s: None for s in SIDES}
            self.tokens: torch.Tensor | None = None
        self.lora_b_bases: dict[str, torch.Tensor] = {}
