"""The options of :meth:`ArithmeticTask.finetune_safety <atax_kernels.tasks.task.ArithmeticTask.finetune_safety>`:
the methods, their checks, and the gradient-projection defaults, which are ``ProjectedOptimizer``'s own (read from
its signature: the task's defaults and the optimizer's cannot drift apart)."""
from __future__ import annotations

import inspect
from types import SimpleNamespace

from ..optim import ProjectedOptimizer
from ..optim.settings import TARGETS

METHODS = ("plain", "ptx", "kl", "projected", "activation")
IMPLS = ("auto", "optim", "manual")

#: ``ProjectedOptimizer``'s keyword defaults (``.mode``, ``.strength``, ``.granularity``, ``.target``,
#: ``.ptx_weight``, ...).
OPTIMIZER_DEFAULTS = SimpleNamespace(**{
    name: param.default for name, param in inspect.signature(ProjectedOptimizer.__init__).parameters.items()
    if param.default is not inspect.Parameter.empty})


def _is_int_at_least_1(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def check_options(*, method: str, target: str, impl: str, n_refs: int, ptx_weight: float, kl_weight: float,
                  refresh_every: int) -> None:
    """Raise ValueError naming the first bad option of ``finetune_safety``."""
    if method not in METHODS:
        raise ValueError(f"finetune_safety: method must be one of {METHODS}, got {method!r}")
    if target not in TARGETS:
        raise ValueError(f"finetune_safety: target must be 'grad' or 'update', got {target!r}")
    if impl not in IMPLS:
        raise ValueError(f"finetune_safety: impl must be 'auto', 'optim' or 'manual', got {impl!r}")
    if not _is_int_at_least_1(n_refs):
        raise ValueError(f"finetune_safety: n_refs must be an int >= 1, got {n_refs!r}")
    for key, value in (("ptx_weight", ptx_weight), ("kl_weight", kl_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"finetune_safety: {key} must be a number >= 0, got {value!r}")
    if method == "ptx" and not ptx_weight > 0:
        raise ValueError("finetune_safety: method='ptx' needs ptx_weight > 0")
    if method == "kl" and not kl_weight > 0:
        raise ValueError("finetune_safety: method='kl' needs kl_weight > 0")
    if method == "projected" and ptx_weight and target == "update":
        raise ValueError("finetune_safety: ptx_weight > 0 needs target='grad' (update projection removes it again)")
    if not _is_int_at_least_1(refresh_every):
        raise ValueError(f"finetune_safety: refresh_every must be an int >= 1, got {refresh_every!r}")
