"""One registry for the backends of ``gram`` and ``combine_``.

Backends: ``torch`` (pure PyTorch, every device), ``cpu`` (C++/OpenMP custom ops ``atax::``),
``cuda`` (CUDA kernels behind the same ``atax::`` ops) and ``triton`` (``atax_triton::`` ops).
``backend=None`` picks the fastest available for the tensors' device; the ``ATAX_BACKEND`` environment
variable overrides that default (an explicit ``backend=`` argument wins over both).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from .._validate import KERNEL_DTYPES

BACKENDS = ("torch", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class Backend:
    """A resolved backend: its name, its two passes, and whether ``combine_`` avoids host syncs."""

    name: str
    gram: Callable[[list[list[torch.Tensor]], bool], torch.Tensor]
    combine_: Callable[[list[torch.Tensor], list[list[torch.Tensor]], torch.Tensor], None]
    sync_free: bool


def _module(name: str) -> ModuleType | None:
    """Import a backend module; None when it cannot serve on this machine at all."""
    if name == "torch":
        from . import reference

        return reference
    if name in ("cpu", "cuda"):
        try:
            from . import cpp
        except ImportError:  # extension wrapper missing from this install: torch serves
            return None
        if not cpp.available():
            return None
        if name == "cuda" and not (torch.cuda.is_available() and cpp.has_cuda_kernels()):
            return None
        return cpp
    if name == "triton":
        try:
            from . import triton as triton_backend
        except Exception:  # triton missing or broken: the other backends serve
            return None
        return triton_backend
    return None


def _supports_device(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        mod = _module("triton")
        return mod is not None and bool(mod.available(device))
    return False


def available_backends() -> list[str]:
    """Backends usable on this machine (may build the C++ extension on first call)."""
    names = ["torch"]
    if _module("cpu") is not None:
        names.append("cpu")
    if _module("cuda") is not None:
        names.append("cuda")
    mod = _module("triton")
    if mod is not None:
        devices = [torch.device("cuda")] if torch.cuda.is_available() else []
        devices.append(torch.device("cpu"))
        if any(mod.available(d) for d in devices):
            names.append("triton")
    return names


_cuda_choice: dict[int, str] = {}


def _fastest_cuda_backend(device: torch.device) -> str:
    """Time ``cuda`` and ``triton`` once per device on a synthetic 8M-element projection; keep the winner."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _cuda_choice:
        return _cuda_choice[index]
    candidates = [n for n in ("cuda", "triton") if _module(n) is not None and _supports_device(n, device)]
    if len(candidates) <= 1:
        choice = candidates[0] if candidates else "torch"
    else:
        g = [torch.randn(1 << 23, device=device)]
        r = [torch.randn(1 << 23, device=device)]
        coefs = torch.full((1,), 1e-3, dtype=torch.float64, device=device)
        timings = {}
        for name in candidates:
            mod = _module(name)
            for _ in range(2):
                mod.gram([g, r], False)
                mod.combine_(g, [r], coefs)
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(5):
                mod.gram([g, r], False)
                mod.combine_(g, [r], coefs)
            torch.cuda.synchronize(device)
            timings[name] = time.perf_counter() - start
        choice = min(timings, key=timings.get)
    _cuda_choice[index] = choice
    return choice


def _default_name(device: torch.device, dtypes: set[torch.dtype]) -> str:
    if not dtypes <= set(KERNEL_DTYPES):
        return "torch"  # float64 lives only in the torch backend
    if device.type == "cpu":
        return "cpu" if _module("cpu") is not None else "torch"
    if device.type == "cuda":
        return _fastest_cuda_backend(device)
    return "torch"


def resolve(backend: str | None, device: torch.device, dtypes: set[torch.dtype]) -> Backend:
    """Pick the backend for tensors on ``device`` with ``dtypes``; raise ValueError/TypeError if impossible."""
    source = "backend"
    if backend is None:
        env = os.environ.get("ATAX_BACKEND", "").strip()
        if env:
            backend, source = env, "ATAX_BACKEND"
    if backend is None:
        name = _default_name(device, dtypes)
    else:
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(
                f"unknown {source} {backend!r}; expected one of {', '.join(repr(b) for b in BACKENDS)}"
            )
        name = backend
        if _module(name) is None or (name != "torch" and name not in available_backends()):
            raise ValueError(
                f"{source} {name!r} is not available on this machine "
                f"(available: {', '.join(available_backends())})"
            )
        if not _supports_device(name, device):
            hint = " (set TRITON_INTERPRET=1 to run Triton on CPU tensors)" if name == "triton" else ""
            raise ValueError(f"{source} {name!r} cannot run on {device.type} tensors{hint}")
        if name != "torch":
            bad = sorted(str(d) for d in dtypes - set(KERNEL_DTYPES))
            if bad:
                raise TypeError(
                    f"{source} {name!r} supports float32, bfloat16 and float16 tensors, got {', '.join(bad)}; "
                    f"use backend='torch' for float64"
                )
    mod = _module(name)
    assert mod is not None
    sync_free = name in ("cuda", "triton") and device.type == "cuda"
    return Backend(name=name, gram=mod.gram, combine_=mod.combine_, sync_free=sync_free)


def resolve_remove_span(
    backend: str | None, device: torch.device, dtypes: set[torch.dtype]
) -> Callable[[list[torch.Tensor], list[torch.Tensor | None]], torch.Tensor]:
    """The ``remove_span_`` implementation of the backend ``resolve`` picks (same names, errors, override).

    Default: ``cpu`` on CPU, ``triton`` on CUDA (it hands large r to cuBLAS itself), else ``torch``.
    ``cuda`` has no hand-written kernel for this op: the torch path (cuBLAS) serves under that name.
    An extension built before the op existed serves the default through torch and refuses an explicit ``cpu``.
    """
    from . import cpp
    from .remove_span_torch import remove_span_torch

    explicit = backend is not None or bool(os.environ.get("ATAX_BACKEND", "").strip())
    if not explicit and device.type == "cuda" and dtypes <= set(KERNEL_DTYPES):
        name = "triton" if _module("triton") is not None and _supports_device("triton", device) else "torch"
    else:
        name = resolve(backend, device, dtypes).name
    if name == "cpu":
        if cpp.remove_span_present():
            return cpp.remove_span_cpp
        if explicit:
            raise ValueError(
                "backend 'cpu' has no atax::remove_span_ in the loaded extension (built before the op existed); "
                "rebuild with `python -m atax_kernels.build`"
            )
        return remove_span_torch
    if name == "triton":
        from .triton import remove_span as trs

        return trs.remove_span_triton
    return remove_span_torch
