"""``ProjectedOptimizer`` checkpoints: the wrapped optimizer's state plus the wrapper's settings, step count, EMA
buffers, subspace and activation bases."""
from __future__ import annotations

import copy
import warnings
from typing import Any

from ..activation.schedule import RefreshSchedule, load_refresh_every_state, refresh_every_state
from ..references.subspace import Subspace

__all__ = ["state_dict", "load_state_dict"]


def state_dict(self: Any) -> dict[str, Any]:
    """The wrapped optimizer's state plus the wrapper's settings, EMA buffers and subspace."""
    return {
        "optimizer": self.optimizer.state_dict(),
        "atax": {
            "settings": {
                "mode": self.mode, "strength": self.strength, "granularity": self.granularity,
                "target": self.target, "ptx_weight": self.ptx_weight, "reference": self.reference,
                "ema_beta": self.ema_beta, "reference_dtype": self.reference_dtype,
                "max_references": self.max_references,
                "refresh_every": refresh_every_state(self.refresh_every),
            },
            "steps": self._steps,
            "ema": [[None if t is None else t.clone() for t in slot] for slot in self._ema],
            "ema_count": list(self._ema_count),
            "subspace": None if self.subspace is None else self.subspace.state_dict(),
            "activation": None if self.activation_subspace is None else self.activation_subspace.state_dict(),
        },
    }


def load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
    """Load a :meth:`state_dict` of this wrapper, or a plain state dict of the wrapped optimizer.

    The constructor's settings (mode, strength, ...) win: a checkpoint saved with other settings loads
    its optimizer state, EMA buffers and subspace, with a ``UserWarning`` naming what differs. A plain
    inner-optimizer state dict (e.g. an AdamW fine-tuning checkpoint, keys ``state``/``param_groups``)
    loads into the wrapped optimizer, and the wrapper starts fresh (no EMA, step count 0).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    if "atax" not in state_dict and "state" in state_dict and "param_groups" in state_dict:
        self.optimizer.load_state_dict(state_dict)
        self._steps, self._ema, self._ema_count, self._pending = 0, [], [], []
        if isinstance(self.refresh_every, RefreshSchedule):
            self.refresh_every.reset()  # the step count starts again, so does the schedule
        return
    if "optimizer" not in state_dict or "atax" not in state_dict:
        raise ValueError("state_dict was not produced by ProjectedOptimizer.state_dict() (expected keys "
                         "'optimizer' and 'atax') nor by a torch optimizer (keys 'state' and 'param_groups'); "
                         f"got keys {sorted(map(str, state_dict))}")
    atax = state_dict["atax"]
    params = self._params()
    for slot in atax["ema"]:
        if len(slot) != len(params):
            raise ValueError(f"EMA state covers {len(slot)} parameters, optimizer has {len(params)}")
    differ = [f"{key}: checkpoint {value!r}, this optimizer {getattr(self, key)!r}"
              for key, value in atax["settings"].items()
              if hasattr(self, key) and key != "refresh_every" and getattr(self, key) != value]
    saved_every = atax["settings"].get("refresh_every")
    if not isinstance(self.refresh_every, RefreshSchedule) and not isinstance(saved_every, dict) \
            and saved_every != self.refresh_every:
        differ.append(f"refresh_every: checkpoint {saved_every!r}, this optimizer {self.refresh_every!r}")
    # the schedule's saved position, loaded into a copy first: a malformed one raises before anything changed
    schedule = copy.deepcopy(self.refresh_every) if isinstance(self.refresh_every, RefreshSchedule) else None
    load_refresh_every_state(schedule if schedule is not None else self.refresh_every, saved_every,
                             "ProjectedOptimizer.load_state_dict")
    self.optimizer.load_state_dict(state_dict["optimizer"])
    if differ:
        warnings.warn("ProjectedOptimizer.load_state_dict: the checkpoint was saved with other settings; "
                      "keeping the constructor's (" + "; ".join(differ) + ")", UserWarning, stacklevel=3)
    self._steps = int(atax["steps"])
    if schedule is not None:
        self.refresh_every.__dict__.update(schedule.__dict__)
    self._ema = [[None if t is None else t.to(p.device, self.reference_dtype or t.dtype) for t, p in zip(slot, params)]
                 for slot in atax["ema"]]
    self._ema_count = list(atax["ema_count"])
    if atax.get("activation") is not None and self.activation_subspace is not None:
        self.activation_subspace.load_state_dict(atax["activation"])
    if atax["subspace"] is not None:
        if self.subspace is None:
            self.subspace = Subspace(params, max_rank=int(atax["subspace"]["max_rank"]))
        self.subspace.load_state_dict(atax["subspace"])
    self._pending = []
