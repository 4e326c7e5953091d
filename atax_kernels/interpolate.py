"""Weight interpolation between a base and an aligned model (WiSE-FT / model-soup style tax trade-off).

``interpolate_(model, base_state, alpha)`` sets every parameter to ``θ_base + α·(θ − θ_base)``:
``α = 1`` keeps the aligned weights, ``α = 0`` restores the base, values in between trade alignment for
capability, and values outside ``[0, 1]`` extrapolate (task arithmetic).
"""
from __future__ import annotations

import fnmatch
import math
import numbers
from typing import Any, Mapping

import torch

from .ops import combine_
from .ops.registry import resolve

__all__ = ["interpolate_"]


def _check_alpha(value: Any, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{label} must be a real number, got {type(value).__name__}")
    a = float(value)
    if not math.isfinite(a):
        raise ValueError(f"{label} must be finite, got {a}")
    return a


def _alphas(names: list[str], alpha: Any) -> dict[str, float]:
    """Per-parameter alpha: a number for all, or first-matching glob pattern, '*' as the default."""
    if not isinstance(alpha, Mapping):
        a = _check_alpha(alpha, "alpha")
        return {n: a for n in names}
    patterns: list[tuple[str, float]] = []
    default = 1.0
    for pat, val in alpha.items():
        if not isinstance(pat, str):
            raise TypeError(f"alpha keys must be str patterns, got {type(pat).__name__} {pat!r}")
        a = _check_alpha(val, f"alpha[{pat!r}]")
        if pat == "*":
            default = a
        else:
            patterns.append((pat, a))
    for pat, _ in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ValueError(
                f"alpha pattern {pat!r} matches no parameter name (names look like {names[:3]!r}); "
                f"check for a typo"
            )
    out = {}
    for n in names:
        out[n] = next((a for pat, a in patterns if fnmatch.fnmatchcase(n, pat)), default)
    return out


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> str:
    """'same' if a and b are the same view of the same memory, 'overlap' if they share storage, else ''."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return ""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return ""
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.shape == b.shape and a.dtype == b.dtype:
        return "same"
    return "overlap"


def interpolate_(
    model: torch.nn.Module,
    base_state: Mapping[str, torch.Tensor],
    alpha: float | Mapping[str, float],
    *,
    backend: str | None = None,
) -> None:
    """In place, for every selected parameter: ``θ ← θ_base + α·(θ − θ_base) = α·θ + (1 − α)·θ_base``.

    Scope: parameters only (``model.named_parameters()``, so a tied weight is updated once, under its
    first name). Buffers (BatchNorm running statistics, rotary caches, ...) are left untouched; copy them
    yourself if they should follow.

    ``alpha``:
        * a number: the same α for every parameter;
        * a mapping from ``fnmatch`` glob patterns over parameter names to numbers, e.g.
          ``{"*.attn.*": 0.5, "lm_head.*": 0.0, "*": 0.8}``. For each parameter the first matching pattern
          in insertion order wins; the key ``"*"`` is the default used only when no other pattern matches
          (wherever it appears). Without ``"*"``, parameters that match no pattern keep α = 1, i.e. are
          left unchanged. A pattern (other than ``"*"``) that matches no parameter name is an error (it is
          almost always a typo).

    A parameter with α = 1 is not touched and needs no entry in ``base_state``; α = 0 copies the base.

    ``base_state`` maps parameter names to tensors (e.g. ``{k: v.clone() for k, v in
    base_model.state_dict().items()}``, possibly on CPU while ``model`` lives on a GPU). Base tensors are
    moved/cast to each parameter's device and dtype one at a time, so at most one parameter's worth of
    extra device memory is used — never a full-model copy.

    Arithmetic: with ``backend=None`` each parameter is updated by ``torch.lerp_`` (one pass over memory,
    fp32 math for half dtypes, rounded once). With an explicit ``backend`` (``"torch"``, ``"cpu"``,
    ``"cuda"``, ``"triton"``) the update goes through the package's fused kernel in two passes,
    ``θ.mul_(α)`` then ``combine_(θ, [θ_base], −(1 − α))`` — mainly to exercise a specific backend; for
    bf16/fp16 parameters it rounds twice. Runs under ``torch.no_grad()`` internally, so it works on
    parameters that require grad (it does not record autograd history).

    Everything is validated before the first write, so on any error the model is left unchanged.

    Raises:
        KeyError: a parameter to be modified has no entry in ``base_state`` (the message names it).
        ValueError: shape mismatch (names the parameter and both shapes); non-finite α; a pattern matching
            no parameter; a base tensor overlapping its parameter's memory in a non-identical way; an
            unusable ``backend``.
        TypeError: ``base_state`` not a mapping, a base entry not a tensor or not floating point, a
            non-floating parameter, α not a real number, a kernel ``backend`` with a float64 parameter.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(base_state, Mapping):
        raise TypeError(f"base_state must be a mapping name -> tensor (e.g. a state_dict), got "
                        f"{type(base_state).__name__}")
    params = list(model.named_parameters())
    alphas = _alphas([n for n, _ in params], alpha)

    plan: list[tuple[str, torch.nn.Parameter, torch.Tensor, float]] = []
    backends: set[tuple[torch.device, torch.dtype]] = set()
    for name, p in params:
        a = alphas[name]
        if a == 1.0:
            continue
        if not p.dtype.is_floating_point:
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}; only floating parameters can be interpolated")
        if name not in base_state:
            raise KeyError(f"base_state has no entry for parameter {name!r} (alpha={a})")
        b = base_state[name]
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"base_state[{name!r}] is a {type(b).__name__}, expected a torch.Tensor")
        if not b.dtype.is_floating_point:
            raise TypeError(f"base_state[{name!r}] has dtype {b.dtype}; expected a floating dtype")
        if b.shape != p.shape:
            raise ValueError(
                f"base_state[{name!r}] has shape {tuple(b.shape)} but parameter {name!r} has shape {tuple(p.shape)}"
            )
        if b.layout != torch.strided or p.layout != torch.strided:
            raise TypeError(f"parameter {name!r}: only dense (strided) tensors are supported")
        overlap = _same_memory(p, b)
        if overlap == "same":
            continue  # θ_base is θ itself: the result is θ, nothing to do
        if overlap == "overlap":
            raise ValueError(f"base_state[{name!r}] shares memory with parameter {name!r}; pass a copy")
        plan.append((name, p, b, a))
        backends.add((p.device, p.dtype))
    if backend is not None:
        for device, dtype in backends:
            resolve(backend, device, {dtype})  # raises ValueError/TypeError before anything is written

    with torch.no_grad():
        for name, p, b, a in plan:
            t = p.detach()
            base = b.detach().to(device=t.device, dtype=t.dtype)
            if _same_memory(t, base) == "same":
                continue
            if a == 0.0:
                t.copy_(base)
            elif backend is None:
                t.lerp_(base, 1.0 - a)
            else:
                t.mul_(a)
                coefs = torch.tensor([-(1.0 - a)], dtype=torch.float64, device=t.device)
                combine_([t], [[base]], coefs, backend=backend)
            del base
