"""Python side of the C++ `atax::` custom ops: backend "cpu" (CPU tensors) and "cuda" (CUDA tensors,
when the extension was built with csrc/cuda/). See ops/CONTRACT.md for the semantics."""
from __future__ import annotations

import threading

import torch
from torch import Tensor

from .. import _ext

__all__ = ["available", "has_cuda_kernels", "gram", "combine_", "remove_span_cpp", "remove_span_present"]

_lock = threading.Lock()
_fakes_done = False


def _ops_present() -> bool:
    try:
        torch.ops.atax.gram  # noqa: B018
        torch.ops.atax.combine_  # noqa: B018
        return True
    except Exception:
        return False


def _register_fakes() -> None:
    global _fakes_done
    if _fakes_done:
        return
    with _lock:
        if _fakes_done:
            return
        try:
            @torch.library.register_fake("atax::gram")
            def _gram_fake(vectors, m, per_tensor):
                n = len(vectors) // m
                shape = (n, m, m) if per_tensor else (m, m)
                return vectors[0].new_empty(shape, dtype=torch.float64)
        except RuntimeError:  # already registered (e.g. module reloaded)
            pass
        try:
            @torch.library.register_fake("atax::combine_")
            def _combine_fake(target, vectors, coefs):
                return None
        except RuntimeError:
            pass
        _fakes_done = True


def available() -> bool:
    """True when the extension loaded and the atax:: ops are registered (builds on first call)."""
    try:
        _ext.load()
        if not _ops_present():
            return False
        _register_fakes()
        return True
    except Exception:
        return False


def has_cuda_kernels() -> bool:
    """True when atax:: ops have CUDA kernels (extension built with csrc/cuda/)."""
    if not available():
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("atax::gram", "CUDA"))
    except Exception:
        return False


def _flat(vectors: list[list[Tensor]]) -> list[Tensor]:
    return [t for v in vectors for t in v]  # vector-major: flat[j * n + i] = vectors[j][i]


def gram(vectors: list[list[Tensor]], per_tensor: bool) -> Tensor:
    """float64 [m, m] Gram of the m concatenated vectors, or [n, m, m] per tensor."""
    return torch.ops.atax.gram(_flat(vectors), len(vectors), bool(per_tensor))


def combine_(target: list[Tensor], vectors: list[list[Tensor]], coefs: Tensor) -> None:
    """target[i] -= sum_j coefs[j] (or coefs[i, j]) * vectors[j][i], in place."""
    torch.ops.atax.combine_(list(target), _flat(vectors), coefs)


# -- atax::remove_span_ (csrc/cpu/remove_span.cpp) --------------------------------------------------
_fake_done = False


def remove_span_present() -> bool:
    """True when the loaded extension has ``atax::remove_span_`` (its fake impl is registered on first call)."""
    global _fake_done
    try:
        torch.ops.atax.remove_span_  # noqa: B018
    except Exception:
        return False
    if not _fake_done:
        try:
            @torch.library.register_fake("atax::remove_span_")
            def _fake(targets, bases):
                return targets[0].new_empty((len(targets), 2), dtype=torch.float64)
        except RuntimeError:  # already registered (module reloaded)
            pass
        _fake_done = True
    return True


def remove_span_cpp(targets: list[torch.Tensor], bases: list[torch.Tensor | None]) -> torch.Tensor:
    """The ``cpu`` backend: the C++ op ``atax::remove_span_``."""
    return torch.ops.atax.remove_span_(list(targets), list(bases))
