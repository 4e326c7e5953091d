"""atax_triton::remove_span_ (the Triton backend of ``remove_span_``).

Placeholder while the kernel is written: delegates to the torch path so the registry's default on CUDA works.
"""
from __future__ import annotations

import torch

from ..remove_span import remove_span_torch


def remove_span_triton(targets: list[torch.Tensor], bases: list[torch.Tensor | None]) -> torch.Tensor:
    return remove_span_torch(targets, bases)
