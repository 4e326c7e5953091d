"""DTensor plumbing, the one place that knows about ``torch.distributed.tensor``: is a tensor a DTensor, and its
local shard. A leaf: imports nothing from the package."""
from __future__ import annotations

import sys
from typing import Iterable

import torch

__all__ = ["dtensor_cls", "is_dtensor", "any_dtensor", "local"]


def dtensor_cls() -> type | None:
    """The DTensor class, or None when ``torch.distributed.tensor`` was never imported (then no DTensor can
    exist, and asking costs no import)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t: torch.Tensor) -> bool:
    cls = dtensor_cls()
    return cls is not None and isinstance(t, cls)


def any_dtensor(tensors: Iterable[torch.Tensor]) -> bool:
    cls = dtensor_cls()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise). Taken under no_grad, so it is the shard's
    storage, not an autograd view: in-place kernels (``combine_``, the realised-update projection) write into it."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()
