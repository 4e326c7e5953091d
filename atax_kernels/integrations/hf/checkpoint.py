"""Saving and resuming what :class:`~.handle.AtaxHandle` holds across trainer checkpoints: the step counter,
the EMA buffers, the Subspace basis, the ActivationSubspace bases and moments, the capability stream's position
and a live reference reused until its next refresh. One file per rank in each ``checkpoint-<step>`` folder."""
from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ...activation import ActivationSubspace
from ...activation.schedule import RefreshSchedule, load_refresh_every_state, refresh_every_state
from ...references.subspace import Subspace
from .ema import EMA, source_of
from .sources import CapabilitySource

__all__ = ["CheckpointState", "REFERENCE_FILE"]

REFERENCE_FILE = "atax_reference.pt"


class CheckpointState:
    """Mixin of :class:`~.handle.AtaxHandle`: its state dict, and its file in a checkpoint folder.

    A loaded state is held in ``self._resume_state`` and applied by :meth:`_apply_resume_state` at the first
    projected step, when the parameters are known on their final devices."""

    def state_dict(self) -> dict[str, Any]:
        """The handle's state: steps, settings, and the reference's state (EMA, Subspace, ActivationSubspace,
        capability stream, live reference)."""
        ref = self.reference
        state: dict[str, Any] = {"version": 1, "steps": self.steps, "kind": type(ref).__name__,
                                 "settings": {"mode": self.mode, "strength": self.strength,
                                              "granularity": self.granularity,
                                              "refresh_every": refresh_every_state(self.refresh_every)}}
        if isinstance(ref, EMA):
            state["ema"] = ref.state_dict()
        if isinstance(ref, Subspace):
            state["subspace"] = ref.state_dict()
        if isinstance(ref, ActivationSubspace):
            state["activation"] = ref.state_dict()
        source = source_of(ref)
        if source is not None:
            state["source"] = source.state_dict()
        if isinstance(ref, CapabilitySource) and self._live is not None:
            # Reused until the next refresh (refresh_every > 1): without it a resumed run would refresh early.
            state["live"] = {"grads": [None if t is None else t.detach() for t in self._live],
                             "inv_scale": self._live_inv_scale}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (applied at the next projected step)."""
        kind = state.get("kind")
        if kind != type(self.reference).__name__:
            raise ValueError(f"atax checkpoint holds a {kind} reference state but this handle's reference is a "
                             f"{type(self.reference).__name__}")
        saved_every = state.get("settings", {}).get("refresh_every")
        if isinstance(self.refresh_every, RefreshSchedule) and isinstance(saved_every, dict):
            # a malformed saved schedule is refused here, before the resumed run starts, not at its first step
            # (a mismatch only warns: once, when the state is applied)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_refresh_every_state(copy.deepcopy(self.refresh_every), saved_every, "atax checkpoint resume")
        self._resume_state = dict(state)

    def _apply_resume_state(self, params: list[torch.Tensor]) -> None:
        state, self._resume_state = self._resume_state, None
        self.steps = int(state["steps"])
        load_refresh_every_state(self.refresh_every, state.get("settings", {}).get("refresh_every"),
                                 "atax checkpoint resume")
        if isinstance(self.reference, EMA) and "ema" in state:
            self.reference.load_state_dict(state["ema"], params)
        if isinstance(self.reference, ActivationSubspace) and "activation" in state:
            self.reference.load_state_dict(state["activation"])
        if isinstance(self.reference, Subspace) and "subspace" in state:
            self.reference.load_state_dict(state["subspace"])
        source = source_of(self.reference)
        if source is not None and "source" in state:
            source.load_state_dict(state["source"])
        if isinstance(self.reference, CapabilitySource) and "live" in state:
            grads = state["live"]["grads"]
            if len(grads) != len(params):
                raise ValueError(f"the checkpoint's live reference covers {len(grads)} parameters, the optimizer "
                                 f"has {len(params)}")
            self._live = [None if t is None else t.to(p.device) for t, p in zip(grads, params)]
            self._live_inv_scale = float(state["live"]["inv_scale"])

    def _rank_file(self) -> str:
        acc = self.trainer.accelerator
        if getattr(acc, "num_processes", 1) > 1:
            return f"atax_reference_rank{acc.process_index}.pt"
        return REFERENCE_FILE

    def _write_checkpoint(self, args: Any, state: Any) -> None:
        """``on_save``: write the state into the trainer's ``checkpoint-<global_step>`` folder."""
        t = self.trainer
        out_dir = t._get_output_dir(trial=None) if hasattr(t, "_get_output_dir") else args.output_dir
        folder = os.path.join(out_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        payload = self.state_dict()
        if self._resume_state is not None:   # saved before any step ran since the resume: keep what was loaded
            payload = dict(self._resume_state)
        torch.save(payload, os.path.join(folder, self._rank_file()))

    def _read_checkpoint(self, folder: str) -> None:
        """On resume: read this rank's file from the checkpoint ``folder`` (a warning when it is missing)."""
        path = os.path.join(folder, self._rank_file())
        self._resume_dir = folder   # DeepSpeed: the engine handle's own file is read at on_train_begin
        if not os.path.isfile(path):
            warnings.warn(f"atax: {path} not found; the reference state starts fresh (the checkpoint was saved "
                          f"without atax attached?)", stacklevel=2)
            return
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
