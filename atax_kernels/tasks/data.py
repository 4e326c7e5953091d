"""What the tiny tasks are made of: the vocabulary (numbers ``0 .. P-1``, then PLUS, EQ, MARKER, REFUSE, BOS),
the ``(a, b)`` operand pairs, their disjoint train/eval :class:`Splits`, and the tiny random-init Llama."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

P = 23
PLUS, EQ, MARKER, REFUSE, BOS = P, P + 1, P + 2, P + 3, P + 4
VOCAB_SIZE = P + 5
PROMPT_LEN = 5
IGNORE = -100

def all_pairs() -> torch.Tensor:
    """``[P*P, 2]`` every ``(a, b)`` pair, in a fixed order."""
    a = torch.arange(P).repeat_interleave(P)
    b = torch.arange(P).repeat(P)
    return torch.stack([a, b], dim=1)


def check_pairs(pairs: Any, name: str) -> torch.Tensor:
    """``pairs`` as a long ``[n, 2]`` tensor of operands in ``0..P-1``; TypeError/ValueError naming ``name``."""
    if not isinstance(pairs, torch.Tensor):
        raise TypeError(f"{name} must be a [n, 2] integer tensor of (a, b) pairs, got {type(pairs).__name__}")
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"{name} must have shape [n, 2], got {list(pairs.shape)}")
    if pairs.dtype.is_floating_point or pairs.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {pairs.dtype}")
    if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= P):
        raise ValueError(f"{name} holds operands outside 0..{P - 1}")
    return pairs.long()


@dataclass(frozen=True)
class Splits:
    """Disjoint train/eval ``[n, 2]`` pair tensors for each side of a task.

    ``capability_train`` feeds everything that protects capability (PTX, KL prompts, reference gradients,
    activation bases); ``safety_train`` the safety loss. Scores are reported on ``*_eval``.
    """

    capability_train: torch.Tensor
    capability_eval: torch.Tensor
    safety_train: torch.Tensor
    safety_eval: torch.Tensor
    seed: int = 0
    task: str = ""

    def __post_init__(self) -> None:
        for side in ("capability", "safety"):
            tr = check_pairs(getattr(self, f"{side}_train"), f"{side}_train")
            ev = check_pairs(getattr(self, f"{side}_eval"), f"{side}_eval")
            if tr.shape[0] == 0 or ev.shape[0] == 0:
                raise ValueError(f"Splits: {side}_train and {side}_eval must both be non-empty "
                                 f"(got {tr.shape[0]} and {ev.shape[0]} pairs)")
            overlap = set(map(tuple, tr.tolist())) & set(map(tuple, ev.tolist()))
            if overlap:
                raise ValueError(f"Splits: {len(overlap)} pair(s) are in both {side}_train and {side}_eval, "
                                 f"e.g. {sorted(overlap)[0]}")

    def sizes(self) -> dict[str, int]:
        """The number of pairs in each of the four parts."""
        return {k: int(getattr(self, k).shape[0])
                for k in ("capability_train", "capability_eval", "safety_train", "safety_eval")}


def split_pairs(pairs: torch.Tensor, train_fraction: float, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``(train, eval)`` cut of ``pairs``, each side non-empty."""
    perm = torch.randperm(pairs.shape[0], generator=generator)
    n_train = max(1, min(pairs.shape[0] - 1, round(train_fraction * pairs.shape[0])))
    return pairs[perm[:n_train]], pairs[perm[n_train:]]


def make_model(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4) -> torch.nn.Module:
    """A randomly initialised tiny ``LlamaForCausalLM`` (fixed seed; float32, CPU, train mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=16,
        bos_token_id=BOS, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.train()
    return model

