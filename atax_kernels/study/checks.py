"""The bad-input checks of a study that need no model: output paths, model arguments, numbers and the method
list. Each raises :class:`~atax_kernels.study.config.StudyError` and writes nothing."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import StudyConfig, StudyError
from .methods import Method, parse_methods

__all__ = ["check_output_path", "check_outputs", "check_model_args", "check_numbers", "check_methods"]


def check_output_path(path: str | os.PathLike, what: str) -> Path:
    """Refuse an output path that cannot be written, without writing anything."""
    p = Path(path).expanduser()
    if p.exists() and p.is_dir():
        raise StudyError(f"{what} {str(path)!r} is a directory; give a file path")
    if p.exists() and not os.access(p, os.W_OK):
        raise StudyError(f"{what} {str(path)!r} cannot be written (no write permission)")
    anc = p.parent
    while not anc.exists():
        if anc == anc.parent:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise StudyError(f"{what} {str(path)!r} cannot be written: {str(anc)!r} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise StudyError(f"{what} {str(path)!r} cannot be written: no write permission in {str(anc)!r}")
    return p


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: absolute/relative/home paths, a .gguf file, or under an existing folder."""
    if name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf"):
        return True
    head = name.split("/")[0]
    return "/" in name and os.path.isdir(head)


def check_model_args(cfg: StudyConfig) -> None:
    """Refuse a missing model path or GGUF file, a GGUF without its package, a bad dtype, an absent CUDA device
    and LoRA without peft."""
    if cfg.gguf is not None:
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise StudyError(f"--gguf {cfg.gguf!r} needs the 'gguf' package to read GGUF files: "
                             f"pip install gguf (or pip install 'atax_kernels[study]')") from None
        gpath = Path(cfg.gguf).expanduser()
        if cfg.model is not None and not gpath.is_absolute():
            gpath = Path(cfg.model).expanduser() / gpath
        if not gpath.is_file():
            raise StudyError(f"--gguf {cfg.gguf!r}: no such file ({str(gpath)!r})")
    if cfg.model is not None and cfg.gguf is None:
        if _looks_local(cfg.model) and not Path(cfg.model).expanduser().exists():
            raise StudyError(f"--model {cfg.model!r}: no such file or directory")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise StudyError(f"--dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise StudyError(f"--device {cfg.device}: CUDA is not available on this machine")
    if cfg.lora_r:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise StudyError("--lora-r needs the 'peft' package: pip install peft") from None


def check_numbers(cfg: StudyConfig) -> None:
    """Refuse counts below their minimum, a held-out fraction outside (0, 1), bad learning rates, seeds,
    objectives, DPO implementation and capability filter."""
    for key in ("steps", "batch_size", "max_length", "refresh_every", "basis_batches", "max_eval",
                "max_new_tokens", "gen_batch_size"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or v < 1:
            raise StudyError(f"--{key.replace('_', '-')} must be an integer >= 1, got {v!r}")
    for key in ("train_eval", "samples", "lora_r"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or v < 0:
            raise StudyError(f"--{key.replace('_', '-')} must be an integer >= 0, got {v!r}")
    if isinstance(cfg.refresh_tol, bool) or not isinstance(cfg.refresh_tol, (int, float)) or \
            not 0.0 <= cfg.refresh_tol < 1.0:
        raise StudyError(f"--refresh-tol must be a number in [0, 1) (0: a fixed refresh interval), got "
                         f"{cfg.refresh_tol!r}")
    if not 0.0 < cfg.held_fraction < 1.0:
        raise StudyError(f"--held-fraction must be in (0, 1), got {cfg.held_fraction}")
    if not cfg.lrs or any(not lr > 0 for lr in cfg.lrs):
        raise StudyError(f"--lr values must be > 0, got {cfg.lrs}")
    if not cfg.seeds:
        raise StudyError("give at least one --seed")
    bad = [o for o in cfg.objectives if o not in ("sft", "dpo")]
    if bad or not cfg.objectives:
        raise StudyError(f"--objective must be sft and/or dpo, got {cfg.objectives}")
    if cfg.dpo_impl not in ("own", "trl"):
        raise StudyError(f"--dpo-impl must be 'own' or 'trl', got {cfg.dpo_impl!r}")
    if cfg.capability_filter not in ("base", "none"):
        raise StudyError(f"--capability-filter must be 'base' or 'none', got {cfg.capability_filter!r}")



def check_outputs(cfg: StudyConfig) -> None:
    """Refuse any of ``--json``, ``--markdown`` and ``--plot`` that cannot be written."""
    for what, path in (("--json", cfg.json), ("--markdown", cfg.markdown), ("--plot", cfg.plot)):
        if path:
            check_output_path(path, what)


def check_methods(cfg: StudyConfig) -> list[Method]:
    """The parsed ``--methods``; with ``--dpo-impl trl`` for DPO, only the methods TRL runs, and trl installed."""
    try:
        methods = parse_methods(cfg.methods)
    except ValueError as exc:
        raise StudyError(f"--methods: {exc}") from None
    if cfg.dpo_impl == "trl" and "dpo" in cfg.objectives:
        from .train import TRL_METHODS

        bad = [m.name for m in methods if m.kind not in TRL_METHODS + ("interp",)]
        if bad:
            raise StudyError(f"--dpo-impl trl runs {', '.join(TRL_METHODS)} (and interp) only; not {', '.join(bad)}")
        nll = [m.name for m in methods if m.lookalikes == "nll"]
        if nll:
            raise StudyError(f"--dpo-impl trl: la=nll (look-alike NLL rows beside the DPO loss) needs the study's own "
                             f"DPO loop; not with trl.DPOTrainer ({', '.join(nll)}): use --dpo-impl own or la=1")
        try:
            import trl  # noqa: F401
        except ImportError:
            raise StudyError("--dpo-impl trl needs the 'trl' package: pip install trl") from None
    return methods
