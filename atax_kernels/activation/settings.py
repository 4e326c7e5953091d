"""The settings of ``ActivationSubspace``: the words each option accepts and the checks of the numbers."""
from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["SIDES", "FREE_OR_FREEZE", "POSITIONS", "WEIGHTINGS", "LORA_RULES", "check_one_of", "check_energy",
           "check_contrast", "check_max_rank"]

#: The two kinds of observed data: the capability data the bases protect, and (with contrast) the safety data.
SIDES = ("capability", "safety")
FREE_OR_FREEZE = ("free", "freeze")
#: Which positions of a loader batch are observed; see ``ActivationSubspace.observe_loader(positions=...)``.
POSITIONS = ("all", "answer", "prompt")
#: How each observed position counts in the second moment; see ``ActivationSubspace(weighting=...)``.
WEIGHTINGS = ("token", "energy")
#: How a LoRA layer is protected; see ``ActivationSubspace(lora=...)``.
LORA_RULES = ("input", "both")


def check_one_of(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_energy(energy: Any) -> float:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not math.isfinite(energy) \
            or not 0.0 <= energy <= 1.0:
        raise ValueError(f"energy must be a number in [0, 1], got {energy!r}")
    return float(energy)


def check_contrast(contrast: Any) -> float:
    if isinstance(contrast, bool) or not isinstance(contrast, (int, float)) or not math.isfinite(contrast) \
            or contrast < 0:
        raise ValueError(f"contrast must be a finite number >= 0, got {contrast!r}")
    return float(contrast)


def check_max_rank(max_rank: Any) -> int | None:
    if max_rank is None:
        return None
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be None or an int >= 1, got {max_rank!r}")
    return max_rank
