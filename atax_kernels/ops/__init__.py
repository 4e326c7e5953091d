"""The two fused passes every projection mode reduces to: ``gram`` and ``combine_``.

Public wrappers validate their arguments and dispatch to a backend chosen by ``registry``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import _validate as validate
from .registry import BACKENDS, available_backends, resolve
from .remove_span import remove_span_

__all__ = ["gram", "combine_", "remove_span_", "available_backends", "BACKENDS"]


def _vector_lists(vectors: Any, name: str) -> list[list[torch.Tensor]]:
    if not isinstance(vectors, (list, tuple)):
        raise TypeError(f"{name} must be a sequence of tensor lists, got {type(vectors).__name__}")
    if len(vectors) == 0:
        raise ValueError(f"{name} is empty: give at least one tensor list")
    return [validate.as_tensor_list(v, f"{name}[{j}]") for j, v in enumerate(vectors)]


def gram(
    vectors: Sequence[Sequence[torch.Tensor]],
    *,
    per_tensor: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Gram matrix of m vectors, each given as a list of tensors, in one pass over memory.

    Args:
        vectors: m parallel tensor lists (same length, shapes and device; dtypes may differ).
        per_tensor: if True, return one Gram per tensor position, shape ``[n_tensors, m, m]``.
        backend: ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None for the fastest available.

    Returns:
        float64 ``[m, m]`` Gram of the concatenated vectors (or ``[n_tensors, m, m]``), on their device.
    """
    lists = _vector_lists(vectors, "vectors")
    validate.check_parallel(lists[0], "vectors[0]", lists[1:], [f"vectors[{j}]" for j in range(1, len(lists))])
    m, n = len(lists), len(lists[0])
    if n == 0:
        shape = (0, m, m) if per_tensor else (m, m)
        return torch.zeros(shape, dtype=torch.float64)
    device = lists[0][0].device
    dtypes = {t.dtype for lst in lists for t in lst}
    impl = resolve(backend, device, dtypes)
    return impl.gram(lists, bool(per_tensor))


def combine_(
    target: Sequence[torch.Tensor],
    vectors: Sequence[Sequence[torch.Tensor]],
    coefs: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """In place, in one pass: ``target[i] -= sum_j coefs[j] * vectors[j][i]``.

    Args:
        target: tensors updated in place (must not overlap each other or any vector).
        vectors: k tensor lists parallel to ``target``.
        coefs: float64 ``[k]`` (global) or ``[n_tensors, k]`` (per tensor), on the tensors' device.
            A term whose coefficient is exactly 0 is skipped (its vector is not read).
        backend: as in :func:`gram`.

    Raises:
        ValueError: when a coefficient is NaN or infinite (it would write NaN into the targets), naming
            its index; nothing is modified. ``project_`` never passes one (it skips non-finite problems
            before combining). The check reads the coefficients on the host: one synchronisation on a GPU.
    """
    targets = validate.as_tensor_list(target, "target")
    lists = _vector_lists(vectors, "vectors")
    validate.check_parallel(targets, "target", lists, [f"vectors[{j}]" for j in range(len(lists))])
    if not isinstance(coefs, torch.Tensor):
        raise TypeError(f"coefs must be a torch.Tensor, got {type(coefs).__name__}")
    k, n = len(lists), len(targets)
    if tuple(coefs.shape) not in ((k,), (n, k)):
        raise ValueError(f"coefs has shape {tuple(coefs.shape)}; expected ({k},) or ({n}, {k}) for k={k}, n={n}")
    if not coefs.dtype.is_floating_point:
        raise TypeError(f"coefs has dtype {coefs.dtype}; expected float64")
    if n == 0:
        return
    device = targets[0].device
    if coefs.device != device:
        raise ValueError(f"coefs is on {coefs.device} but target is on {device}")
    bad = ~torch.isfinite(coefs)
    if bool(bad.any()):
        where = [tuple(i) if len(i) > 1 else i[0] for i in torch.nonzero(bad).tolist()]
        raise ValueError(f"coefs has non-finite values (NaN/inf) at {where[:8]}; the targets they apply to "
                         f"would become non-finite, so nothing was written")
    validate.check_no_overlap(targets, "target", lists, [f"vectors[{j}]" for j in range(len(lists))])
    dtypes = {t.dtype for lst in [targets, *lists] for t in lst}
    impl = resolve(backend, device, dtypes)
    impl.combine_(targets, lists, coefs.to(torch.float64).contiguous())
