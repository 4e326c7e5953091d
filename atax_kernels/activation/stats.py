"""``ActivationStats``: what the activation projection did in one optimizer step (ranks, removed fractions), and
the float64 squared norm its rows are made of."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ActivationStats", "sq_norm"]


@dataclass
class ActivationStats:
    """What the activation projection did in one optimizer step (tensors stay on the device).

    Attributes:
        ranks: per protected module name, the rank of its basis (tokens for embeddings).
        names: the module (and parameter) names of the rows of ``per_target``.
        per_target: float64 ``[n, 2]``: ``|dW|^2`` before and ``|dW U|^2`` removed, per projected target.
        update_removed_fraction: scalar ``|removed| / |update|`` over every protected parameter's update.
    """

    ranks: dict[str, int]
    names: list[str]
    per_target: torch.Tensor
    update_removed_fraction: torch.Tensor

    @property
    def feature_rank_mean(self) -> float:
        """Mean basis rank over the protected modules (LoRA ``.lora_B`` factors counted apart)."""
        r = [v for k, v in self.ranks.items() if not k.endswith(".lora_B")]
        return sum(r) / max(1, len(r))

    @property
    def lora_b_rank_max(self) -> int | None:
        """Largest basis rank a LoRA B update is projected off (0 with ``lora="input"``); None without LoRA."""
        r = [v for k, v in self.ranks.items() if k.endswith(".lora_B")]
        return max(r) if r else None


def sq_norm(t: torch.Tensor) -> torch.Tensor:
    """``|t|^2`` summed in float64 (a 0-dim tensor on ``t``'s device; 0 for an empty ``t``)."""
    return torch.sum(t.to(torch.float64) ** 2) if t.numel() else torch.zeros((), dtype=torch.float64,
                                                                             device=t.device)
