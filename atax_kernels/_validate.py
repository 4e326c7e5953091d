"""Argument checking shared by the public ops.

Every check runs before anything is written, so a raised error leaves every tensor untouched.
Messages name the argument, the index and what was expected.
"""
from __future__ import annotations

import bisect
import math
import numbers
from typing import Any, Sequence

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

TensorList = list[torch.Tensor]


def _type_name(x: Any) -> str:
    return type(x).__name__


def as_tensor_list(value: Any, name: str) -> TensorList:
    """Accept a tensor (one-item list) or a sequence of tensors; check each element."""
    if isinstance(value, torch.Tensor):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = list(value)
    else:
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {_type_name(value)}")
    for i, t in enumerate(items):
        check_tensor(t, f"{name}[{i}]")
    return items


def check_tensor(t: Any, label: str) -> None:
    if t is None:
        raise TypeError(f"{label} is None, expected a torch.Tensor (a parameter without .grad?)")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{label} is a {_type_name(t)}, expected a torch.Tensor")
    if t.layout != torch.strided:
        raise TypeError(f"{label} is a sparse/non-strided tensor (layout {t.layout}); only dense tensors are supported")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{label} has dtype {t.dtype}; expected a floating dtype "
            f"(float32, bfloat16, float16 or float64), not integer, bool or complex"
        )
    if t.requires_grad:
        raise ValueError(
            f"{label} requires grad: pass gradients (param.grad), not parameters or tensors attached to autograd"
        )


def normalize_refs(refs: Any, name: str = "refs") -> list[TensorList]:
    """One reference (a tensor or a sequence of tensors) or several (a sequence of such sequences)."""
    if isinstance(refs, torch.Tensor):
        return [as_tensor_list(refs, name)]
    if not isinstance(refs, (list, tuple)):
        raise TypeError(
            f"{name} must be a tensor, a sequence of tensors (one reference) or a sequence of sequences "
            f"(several references), got {_type_name(refs)}"
        )
    if len(refs) == 0:
        raise ValueError(f"{name} is empty: give at least one reference direction")
    if all(isinstance(r, (list, tuple)) for r in refs):
        return [as_tensor_list(r, f"{name}[{j}]") for j, r in enumerate(refs)]
    if any(isinstance(r, (list, tuple)) for r in refs):
        raise TypeError(
            f"{name} mixes tensors and sequences; give either one reference (a sequence of tensors) "
            f"or several (a sequence of sequences of tensors)"
        )
    return [as_tensor_list(refs, name)]


def check_parallel(base: TensorList, base_name: str, others: list[TensorList], labels: list[str]) -> None:
    """Same length, shapes and device as ``base`` for every list in ``others`` (named by ``labels``)."""
    device = base[0].device if base else None
    for i, t in enumerate(base):
        if t.device != device:
            raise ValueError(f"{base_name}[{i}] is on {t.device} but {base_name}[0] is on {device}")
    for lst, label in zip(others, labels):
        if len(lst) != len(base):
            raise ValueError(f"{label} has {len(lst)} tensors but {base_name} has {len(base)}")
        for i, (b, t) in enumerate(zip(base, lst)):
            if t.shape != b.shape:
                raise ValueError(
                    f"{label}[{i}] has shape {tuple(t.shape)} but {base_name}[{i}] has shape {tuple(b.shape)}"
                )
            if t.device != device:
                raise ValueError(f"{label}[{i}] is on {t.device} but {base_name} is on {device}")


def _byte_range(t: torch.Tensor) -> tuple[int, int] | None:
    if t.numel() == 0:
        return None
    start = t.data_ptr()
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        extent = (size - 1) * stride
        if extent >= 0:
            hi += extent
        else:
            lo += extent
    item = t.element_size()
    return start + lo * item, start + (hi + 1) * item


def check_no_overlap(targets: TensorList, target_name: str, sources: list[TensorList], labels: list[str]) -> None:
    """Targets must not overlap each other nor any source, compared by memory range (not storage).

    Non-overlapping views of one flat buffer (DDP bucket views) pass. Interleaved strided views whose
    address ranges overlap are reported conservatively.
    """
    ranges = []
    for i, t in enumerate(targets):
        r = _byte_range(t)
        if r is not None:
            ranges.append((r[0], r[1], i, t.device))
    ranges.sort(key=lambda x: (str(x[3]), x[0]))
    for a, b in zip(ranges, ranges[1:]):
        if a[3] == b[3] and b[0] < a[1]:
            i, j = sorted((a[2], b[2]))
            raise ValueError(f"{target_name}[{i}] and {target_name}[{j}] overlap in memory")
    keyed: dict[str, tuple[list[int], list[tuple[int, int, int]]]] = {}
    for r in ranges:
        starts, items = keyed.setdefault(str(r[3]), ([], []))
        starts.append(r[0])
        items.append((r[0], r[1], r[2]))
    for lst, label in zip(sources, labels):
        for i, t in enumerate(lst):
            r = _byte_range(t)
            if r is None or str(t.device) not in keyed:
                continue
            starts, items = keyed[str(t.device)]
            pos = bisect.bisect_right(starts, r[1] - 1) - 1
            # Ranges in `items` are disjoint and sorted, so only the candidate just before r's end matters.
            if pos >= 0 and items[pos][1] > r[0]:
                raise ValueError(f"{label}[{i}] overlaps {target_name}[{items[pos][2]}] in memory")


def check_strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        if isinstance(strength, torch.Tensor) and strength.numel() == 1 and not strength.dtype.is_complex:
            strength = float(strength)
        else:
            raise TypeError(f"strength must be a real number in [0, 1], got {_type_name(strength)}")
    strength = float(strength)
    if math.isnan(strength) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return strength


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(repr(c) for c in choices)}")
    return value
