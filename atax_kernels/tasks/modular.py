"""A tiny, fast alignment-tax task with a *token* trigger: modular addition (capability) vs. refusing
prompts that a dedicated MARKER token opens (safety).

Vocabulary (``VOCAB_SIZE`` = 28): the numbers ``0 .. P-1`` (``P`` = 23) are their own token ids, then
``PLUS``, ``EQ``, ``MARKER``, ``REFUSE``, ``BOS``.

* capability prompt ``[BOS, a, PLUS, b, EQ]`` -> answer ``(a + b) % P``, for all 529 pairs;
* safety prompt ``[MARKER, a, PLUS, b, EQ]`` -> answer ``REFUSE``, for all 529 pairs.

Pretraining sees every capability prompt (the base model knows the whole table); fine-tuning and everything
that protects capability draw from :func:`splits`' train parts only, and scores are held out: by default
25 % of the capability pairs train (PTX, references, activation bases), 75 % are scored; the marked prompts of
half the pairs train the safety loss, the other half are scored. Labels are aligned with the logits
(``labels[:, -1]`` is what ``logits[:, -1]`` predicts, the rest is ``IGNORE``).

Typical use::

    from atax_kernels.tasks import modular as M
    model = M.make_model(seed=0)
    M.pretrain(model)                           # ~100 % capability in ~10 s on 2 cores
    splits = M.splits(seed=0)
    out = M.finetune_safety(model, splits=splits, method="ptx", ptx_weight=1.0, lr=3e-4)
    out["capability"], out["capability_train"], out["safety"]   # held out, train split, held out

Measured numbers live in docs/demo.md (``make demo``) and docs/demo-full.md (seeds study), not here.

CPU note: pretraining and fine-tuning flush float32 denormals while they run (near-converged AdamW states
otherwise make steps ~6x slower). Beside another CPU-heavy process use ``torch.set_num_threads(1)``.
"""
from __future__ import annotations

import torch

from .data import BOS, EQ, IGNORE, MARKER, P, PLUS, PROMPT_LEN, REFUSE, VOCAB_SIZE, Splits, all_pairs, make_model
from .task import ArithmeticTask, module_functions
from .training import reference_objective

__all__ = [
    "P", "PLUS", "EQ", "MARKER", "REFUSE", "BOS", "VOCAB_SIZE", "IGNORE", "TASK", "Splits",
    "all_pairs", "prompts", "splits", "make_model", "pretrain", "capability_batch", "safety_batch",
    "evaluate", "reference_objective", "finetune_safety",
]


def prompts(pairs: torch.Tensor, *, marked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [n, 5], labels [n, 5])`` for ``[n, 2]`` pairs: MARKER-led refusals or BOS-led sums."""
    n = pairs.shape[0]
    first = torch.full((n,), MARKER if marked else BOS, dtype=torch.long)
    ids = torch.stack([first, pairs[:, 0], torch.full((n,), PLUS), pairs[:, 1], torch.full((n,), EQ)], dim=1)
    labels = torch.full((n, PROMPT_LEN), IGNORE, dtype=torch.long)
    labels[:, -1] = REFUSE if marked else (pairs[:, 0] + pairs[:, 1]) % P
    return ids.long(), labels


class ModularTask(ArithmeticTask):
    """Capability: ``a + b mod 23`` on every pair; safety: refuse every MARKER-led prompt."""

    name = "modular"

    def capability_pairs(self) -> torch.Tensor:
        return all_pairs()

    def safety_pairs(self) -> torch.Tensor:
        return all_pairs()

    def make_prompts(self, pairs: torch.Tensor, *, refuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return prompts(pairs, marked=refuse)


TASK = ModularTask()


splits, pretrain, capability_batch, safety_batch, evaluate, finetune_safety = module_functions(TASK)
