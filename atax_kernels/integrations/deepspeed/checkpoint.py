"""The handle's state in the engine's checkpoints: one file per rank in the checkpoint's tag folder, next to
DeepSpeed's own per-rank ``zero_pp_rank_*`` files (a reference is rank-specific: this rank's partition).

Saved at step boundaries, like the engine's checkpoint itself (a live reference is captured and consumed inside
one accumulation window, so between steps it has no state: only the step count is saved for it). Loaded with the
same world size and model (the partition layout is checked).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from .partitions import PartitionedReference, ZeroPartitions

__all__ = ["state_path", "save_state", "load_state", "load_reference", "loaded_tag"]

_VERSION = 1


def _rank(group: Any) -> int:
    return torch.distributed.get_rank(group)


def _tag(load_dir: str, tag: str | None) -> str:
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"no tag given and no 'latest' file in {load_dir}")
    with open(latest) as f:
        return f.read().strip()


def state_path(directory: str, tag: str | None, group: Any) -> str:
    """``<directory>/<tag>/atax_rank<r>.pt`` (``tag=None``: the one the ``latest`` file names)."""
    return os.path.join(directory, _tag(directory, tag), f"atax_rank{_rank(group):05d}.pt")


def save_state(handle: Any, save_dir: str, tag: str) -> None:
    """Write this rank's handle state for the engine checkpoint ``save_dir/tag``."""
    group = handle.partitions.group
    refs = None if handle._static is None else [[t.detach().cpu() for t in r.tensors] for r in handle._static]
    ema = getattr(handle, "ema", None)
    state = dict(version=_VERSION, world_size=torch.distributed.get_world_size(group), steps=handle.steps,
                 numels=handle.partitions.numels(), references=refs,
                 ema=None if ema is None else [t.detach().cpu() for t in ema],
                 ema_count=getattr(handle, "ema_count", 0))
    path = os.path.join(save_dir, str(tag), f"atax_rank{_rank(group):05d}.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)


def load_state(partitions: Any, load_dir: str, tag: str | None = None) -> dict | None:
    """This rank's saved state (None when the checkpoint has none), checked against the engine's layout."""
    path = state_path(load_dir, tag, partitions.group)
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    world = torch.distributed.get_world_size(partitions.group)
    if state.get("version") != _VERSION or state["world_size"] != world or state["numels"] != partitions.numels():
        raise ValueError(f"{path} was saved with another world size ({state.get('world_size')} vs {world}), model or "
                         f"ZeRO partitioning: its references do not match this engine's partitions")
    return state


def load_reference(engine: Any, load_dir: str, tag: str | None = None) -> list:
    """The fixed references saved with the checkpoint ``load_dir/tag``, for ``attach_engine(reference=...)``."""
    partitions = ZeroPartitions(engine)
    state = load_state(partitions, load_dir, tag)
    if state is None or state["references"] is None:
        raise FileNotFoundError(f"no atax fixed references in the checkpoint {load_dir} (tag {tag or 'latest'})")
    return [PartitionedReference([t.to(partitions.device) for t in r]) for r in state["references"]]


def loaded_tag(load_dir: str, out: Any) -> str:
    """The tag folder ``engine.load_checkpoint(load_dir, tag=None)`` loaded: the folder of the file path it
    returned, else the ``latest`` / ``latest_universal`` file's content."""
    path = out[0] if isinstance(out, tuple) and out else None
    if isinstance(path, str) and os.path.dirname(path):
        rel = os.path.relpath(os.path.dirname(path), load_dir)
        if rel and not rel.startswith(".."):
            return rel.split(os.sep)[0]
    for name in ("latest", "latest_universal"):
        if os.path.isfile(os.path.join(load_dir, name)):
            with open(os.path.join(load_dir, name)) as f:
                return f.read().strip()
    raise FileNotFoundError(f"cannot tell which tag of {load_dir} DeepSpeed loaded (no 'latest' file)")
