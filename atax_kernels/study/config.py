"""What a study is asked to do: :class:`StudyConfig` (model, data, grid, training, scoring, outputs), the
training knobs every run shares with it (:class:`TrainSettings`, one definition for both), and
:class:`StudyError`, the bad input refused before any training step."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .methods import QUICK_METHODS

__all__ = ["StudyError", "TrainSettings", "StudyConfig", "train_settings"]


class StudyError(Exception):
    """Bad input, found before any training step; the CLI prints it and exits with status 2."""


@dataclass
class TrainSettings:
    """The training knobs of one safety-tuning run that a study sets once for all its runs."""

    steps: int = 30
    batch_size: int = 8
    weight_decay: float = 0.0
    beta: float = 0.1  # DPO's beta
    refresh_every: int = 10  # steps between activation-basis refreshes
    #: > 0: a refresh is skipped (its eigensolves, not its forwards) while every basis still holds energy - tol
    #: of what it observes, and the interval doubles (atax_kernels.activation.RefreshSchedule); 0: fixed interval
    refresh_tol: float = 0.0
    basis_batches: int = 4  # retain batches the activation bases observe
    backend: str | None = None


@dataclass
class StudyConfig(TrainSettings):
    """Every setting of ``python -m atax_kernels.study`` (the training knobs of :class:`TrainSettings` included)."""

    # model
    model: str | None = None
    gguf: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    template: str | None = None
    lora_r: int = 0
    cache_dir: str | None = None
    # data
    capability_data: str | None = None
    safety_data: str | None = None
    benign_data: str | None = None
    lookalike_data: str | None = None
    prompt_col: str = "prompt"
    response_col: str | None = None
    group_col: str | None = None
    answer_col: str | None = None
    capability_filter: str = "base"
    held_fraction: float = 0.5
    # grid
    objectives: tuple[str, ...] = ("sft",)
    lrs: tuple[float, ...] = (1e-5,)
    seeds: tuple[int, ...] = (0,)
    methods: str = QUICK_METHODS
    # training, beyond TrainSettings
    max_length: int = 128
    dpo_impl: str = "own"
    # scoring
    max_eval: int = 48
    train_eval: int = 16
    max_new_tokens: int = 20
    gen_batch_size: int = 16
    samples: int = 2
    # outputs
    json: str | None = None
    markdown: str | None = None
    plot: str | None = None
    progress: bool = True
    tier: str = "custom"
    command: str = ""
    #: reuse the rows of an earlier, interrupted run of the same configuration (``<json>.rows.jsonl``)
    resume: bool = False


def train_settings(cfg: TrainSettings) -> dict[str, Any]:
    """The :class:`TrainSettings` fields of ``cfg``, as keyword arguments."""
    return {f.name: getattr(cfg, f.name) for f in fields(TrainSettings)}
