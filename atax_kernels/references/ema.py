"""The one EMA fold of capability gradients (``e <- beta e + (1 - beta) g / scale``; the first capture copied),
used by ``ProjectedOptimizer(reference="ema")`` and the HF ``EMA`` reference. A leaf.

Whether a capture may be folded is decided from its squared norm, which the caller computes globally (all-reduced
under FSDP2) so that every rank takes the same decision: a non-finite capture never enters the EMA; an all-zero
one (checkpoint loaders stepping with zero gradients) must not decay it.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["capture_verdict", "fold_ema_"]


def capture_verdict(norm_sq: float) -> Literal["fold", "nonfinite", "zero"]:
    """What to do with a capture whose global squared norm is ``norm_sq``."""
    if not math.isfinite(norm_sq):
        return "nonfinite"
    if norm_sq == 0.0:
        return "zero"
    return "fold"


def fold_ema_(buffers: list[torch.Tensor | None], captured: list[torch.Tensor | None], *, first: bool,
              beta: float, inv_scale: float, dtype: torch.dtype | None) -> None:
    """Fold ``captured`` (aligned with ``buffers``; None entries skipped) into ``buffers`` in place, in
    ``dtype`` (default: each capture's dtype). ``first``: copy instead of averaging (the EMA's first capture)."""
    if len(buffers) != len(captured):
        raise ValueError(f"the parameter list changed size ({len(buffers)} -> {len(captured)}) since the EMA was "
                         f"created")
    for i, t in enumerate(captured):
        if t is None:
            continue
        d = dtype or t.dtype
        if buffers[i] is None or first:
            buffers[i] = (t.to(d) * inv_scale) if inv_scale != 1.0 else t.to(d, copy=True)
        else:
            src = t if t.dtype == d else t.to(d)
            buffers[i].mul_(beta).add_(src, alpha=(1.0 - beta) * inv_scale)
