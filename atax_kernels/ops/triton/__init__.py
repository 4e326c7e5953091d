"""Triton backend (ops ``atax_triton::gram`` / ``atax_triton::combine_``).

Import-safe: importing this package imports triton and registers the ops inside a try block; if triton is
missing or broken the package still imports and ``available()`` is False. ``available(device)`` says whether the backend can run on ``device``:
CUDA devices when triton imports, CUDA is available and the kernels are compiled; CPU only when
``TRITON_INTERPRET=1`` was set when this package was imported (``INTERPRET``).
"""
from __future__ import annotations

import os

import torch

#: Whether the kernels below are interpreted, read ONCE, before they are defined: triton decides it when a
#: kernel is defined, so a later change of TRITON_INTERPRET cannot move compiled kernels to the CPU (feeding
#: them CPU tensors would crash) nor interpreted ones to the GPU. ``available`` answers from this value.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_error: BaseException | None = None
try:  # eager, so that the submodules never shadow the functions below; never raises
    from . import combine as _combine_mod  # noqa: F401  (registers atax_triton::combine_)
    from . import gram as _gram_mod  # noqa: F401  (registers atax_triton::gram)

    _loaded = True
except Exception as e:  # triton missing or broken
    _loaded, _error = False, e


def _load() -> bool:
    return _loaded


def available(device: torch.device | None = None) -> bool:
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available() and not INTERPRET
    elif device.type == "cpu":
        ok = INTERPRET
    else:
        ok = False
    return ok and _load()


def gram(vectors: list[list[torch.Tensor]], per_tensor: bool) -> torch.Tensor:
    if not _load():
        raise RuntimeError(f"atax triton backend unavailable: {_error!r}")
    m = len(vectors)
    flat = [t for lst in vectors for t in lst]
    return torch.ops.atax_triton.gram(flat, m, bool(per_tensor))


def combine_(target: list[torch.Tensor], vectors: list[list[torch.Tensor]], coefs: torch.Tensor) -> None:
    if not _load():
        raise RuntimeError(f"atax triton backend unavailable: {_error!r}")
    flat = [t for lst in vectors for t in lst]
    torch.ops.atax_triton.combine_(list(target), flat, coefs)


__all__ = ["available", "gram", "combine_"]
