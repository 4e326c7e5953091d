"""Small, fast alignment-tax tasks for tests and demos, each with held-out train/eval splits.

* :mod:`atax_kernels.tasks.modular`: a tiny Llama learns ``a + b mod 23``; safety teaches it to answer REFUSE
  when a dedicated MARKER token opens the prompt (a *token* trigger).
* :mod:`atax_kernels.tasks.overflow`: the same model and prompts, no marker; safety teaches it to refuse the
  pairs whose sum wraps around (a *semantic* trigger: capability and safety prompts share every token).

Both expose ``splits(seed)``, ``pretrain``, ``finetune_safety(model, splits=..., method=...)`` and
``evaluate(model, splits)``; everything that trains draws only from the ``*_train`` splits, every score is on
``*_eval`` with the train-split score beside it. Needs ``transformers``.
"""
from __future__ import annotations

from .data import Splits
from .options import METHODS
from .task import ArithmeticTask

TASKS = ("modular", "overflow")


def get(name: str) -> ArithmeticTask:
    """The task object by name (``"modular"`` or ``"overflow"``)."""
    if name == "modular":
        from .modular import TASK
    elif name == "overflow":
        from .overflow import TASK
    else:
        raise ValueError(f"unknown task {name!r}; expected one of {TASKS}")
    return TASK


__all__ = ["ArithmeticTask", "Splits", "METHODS", "TASKS", "get", "modular", "overflow"]
