"""``ProjectedOptimizer``'s constructor arguments: every check, before the wrapper holds anything."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .. import _validate as validate
from ..projection import GRANULARITIES, MODES
from ..activation.schedule import RefreshSchedule, check_refresh_every, check_schedule_for
from ..references.subspace import Subspace

__all__ = ["TARGETS", "REFERENCE_KINDS", "check_settings", "check_activation_settings"]

TARGETS = ("grad", "update")
REFERENCE_KINDS = ("live", "ema")


def _binds_no_args(fn: Callable[..., Any]) -> bool:
    """Whether ``fn()`` is a valid call (True when the signature cannot be read)."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind()
    except TypeError:
        return False
    return True


def check_settings(optimizer: Any, *, mode: str, strength: float, granularity: str, target: str,
                   ptx_weight: float, reference: str, ema_beta: float, reference_dtype: torch.dtype | None,
                   max_references: int, subspace: Any, reference_fn: Any, refresh_every: int,
                   backend: str | None) -> float:
    """Raise TypeError/ValueError naming the bad argument; returns the checked strength."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    validate.check_choice(mode, "mode", MODES)
    validate.check_choice(granularity, "granularity", GRANULARITIES)
    validate.check_choice(target, "target", TARGETS)
    validate.check_choice(reference, "reference", REFERENCE_KINDS)
    strength = validate.check_strength(strength)
    if isinstance(ptx_weight, bool) or not isinstance(ptx_weight, (int, float)) or not ptx_weight >= 0 \
            or not math.isfinite(ptx_weight):
        raise ValueError(f"ptx_weight must be a finite number >= 0, got {ptx_weight!r}")
    if ptx_weight > 0 and target == "update":
        raise ValueError(
            "ptx_weight > 0 needs target='grad': projecting the update would remove the PTX component "
            "again (measured: PTX on top of update projection lost its effect)"
        )
    if not (isinstance(ema_beta, (int, float)) and 0.0 <= ema_beta < 1.0):
        raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta!r}")
    if reference_dtype is not None and reference_dtype not in validate.SUPPORTED_DTYPES:
        raise TypeError(f"reference_dtype must be a floating dtype, got {reference_dtype}")
    if isinstance(max_references, bool) or not isinstance(max_references, int) or max_references < 1:
        raise ValueError(f"max_references must be a positive int, got {max_references!r}")
    if subspace is not None and not isinstance(subspace, Subspace):
        raise TypeError(f"subspace must be an atax_kernels.Subspace, got {type(subspace).__name__}")
    if reference_fn is not None and not callable(reference_fn):
        raise TypeError("reference_fn must be callable (returning a capability loss)")
    if reference_fn is not None and (isinstance(reference_fn, torch.nn.Module) or not _binds_no_args(reference_fn)):
        raise TypeError(
            f"reference_fn is called with no arguments and returns the capability loss, e.g. "
            f"reference_fn=lambda: loss_fn(model, next(batches)); got "
            f"{'a torch.nn.Module (the model?)' if isinstance(reference_fn, torch.nn.Module) else 'a callable that needs arguments'}"
            f" (atax_kernels.hf.attach(reference=...) is the one that takes (model) -> loss)")
    check_refresh_every(refresh_every, "ProjectedOptimizer")
    if backend is not None:
        validate.check_choice(backend, "backend", ("torch", "cpu", "cuda", "triton"))
    return strength


def check_activation_settings(optimizer: Any, activation_subspace: Any, activation_target: str | None, *,
                              ptx_weight: float, mode: str, strength: float, granularity: str,
                              reference_fn: Any = None, refresh_every: Any = 1) -> str:
    """Check the activation-space arguments; returns the resolved ``activation_target``."""
    if isinstance(refresh_every, RefreshSchedule):
        if activation_subspace is None or reference_fn is None:
            raise ValueError(
                f"ProjectedOptimizer(refresh_every={refresh_every!r}): a RefreshSchedule decides when "
                f"activation_subspace is refreshed from reference_fn (a no-grad capability forward); it needs both "
                f"(got activation_subspace={'None' if activation_subspace is None else 'given'}, "
                f"reference_fn={'None' if reference_fn is None else 'given'}); gradient references take an int")
    if activation_subspace is not None:
        from ..activation import ActivationSubspace

        if not isinstance(activation_subspace, ActivationSubspace):
            raise TypeError("activation_subspace must be an atax_kernels.ActivationSubspace, got "
                            f"{type(activation_subspace).__name__}")
        activation_subspace.check_protects(
            [p for group in optimizer.param_groups for p in group["params"]], where="this optimizer")
    if isinstance(refresh_every, RefreshSchedule):
        check_schedule_for(activation_subspace, refresh_every, "ProjectedOptimizer", can_observe=True)
    if activation_target is None:
        activation_target = "grad" if ptx_weight > 0 else "update"
    validate.check_choice(activation_target, "activation_target", ("update", "grad"))
    if activation_subspace is not None and ptx_weight > 0 and activation_target == "update":
        raise ValueError(
            "ptx_weight > 0 with activation_target='update' would project the PTX part of the update away "
            "with the rest (PTX's update lies in the protected span by construction); use "
            "activation_target='grad' (the default with ptx_weight > 0): the safety gradient is projected, "
            "the PTX gradient added after")
    if activation_subspace is not None and ptx_weight > 0 and activation_target == "grad":
        given = [f"{k}={v!r}" for k, v, default in (("mode", mode, "orthogonal"), ("strength", strength, 1.0),
                                                    ("granularity", granularity, "global")) if v != default]
        if given:
            raise ValueError(
                f"ProjectedOptimizer(activation_subspace=..., ptx_weight > 0): {', '.join(given)} do not apply "
                f"to activation projection: the safety gradient is projected off each protected weight's "
                f"capability input basis (entirely), and the captured references are added as PTX, not "
                f"projected against; leave them at their defaults (the dial is the subspace's energy=)")
    return activation_target
