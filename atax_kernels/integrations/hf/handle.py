"""``AtaxHandle``: what ``attach`` installs on a trainer and how it is undone. It wraps ``training_step``,
``log`` and the checkpoint loader on the instance and adds a checkpoint callback, then hands each synchronising
micro-batch to the gradient or the activation step; logging and checkpoints are its mixins."""
from __future__ import annotations

from typing import Any

import torch

from ...activation import ActivationSubspace
from ...projection import ProjectionStats
from .activation_step import ActivationStep
from .checkpoint import CheckpointState
from .deepspeed_step import DeepSpeedStep, is_deepspeed
from .gradient_step import GradientStep
from .logging import LoggingWindow

__all__ = ["AtaxHandle"]

#: ``trainer.__dict__`` had no such attribute before attach (the class's method was used): detach removes ours.
_MISSING = object()


class AtaxHandle(GradientStep, ActivationStep, LoggingWindow, CheckpointState, DeepSpeedStep):
    """Returned by :func:`attach`. ``detach()`` restores the trainer.

    Attributes:
        last_stats: the :class:`~atax_kernels.ProjectionStats` of the latest projection (None before).
        last_ref_norm: ``[k]`` float64 tensor, norms of the references of the latest projection (unscaled).
        steps: optimizer steps projected so far (restored from checkpoints).
        reference: the normalised reference (``CapabilitySource``, ``EMA`` or ``Subspace``).
    """

    def __init__(self, trainer: Any, reference: Any, mode: str, strength: float, granularity: str,
                 refresh_every: int, reference_dtype: torch.dtype | None, backend: str | None):
        self.trainer = trainer
        self.mode, self.strength, self.granularity = mode, strength, granularity
        self.refresh_every, self.reference_dtype, self.backend = refresh_every, reference_dtype, backend
        self.reference = reference
        self.last_stats: ProjectionStats | None = None
        self.last_ref_norm: torch.Tensor | None = None
        self.steps = 0
        self._live: list[torch.Tensor | None] | None = None   # the live capability gradients, until reused
        self._live_inv_scale = 1.0
        self._unlogged = False
        self._resume_state: dict[str, Any] | None = None
        self._attached = False
        self._saved: dict[str, Any] = {}
        self.callback = None
        #: DeepSpeed ZeRO: the projection runs inside the engine (deepspeed_step.py), attached at on_train_begin.
        self.deepspeed = is_deepspeed(trainer)

    # -- install / uninstall ----------------------------------------------------------------------------
    def _install(self) -> None:
        from transformers import TrainerCallback

        t = self.trainer
        handle = self
        for name in ("training_step", "log", "_load_optimizer_and_scheduler"):
            self._saved[name] = t.__dict__.get(name, _MISSING)
        orig_step, orig_log = t.training_step, t.log
        orig_load = getattr(t, "_load_optimizer_and_scheduler", None)

        def training_step(*args: Any, **kwargs: Any) -> Any:
            if handle.deepspeed:   # the engine projects inside accelerator.backward(): log what it did
                eh = handle.engine_handle
                if eh is not None and getattr(eh, "capture_due", False):
                    eh.capture()   # the window's capability micro-step, before the safety forward (ZeRO-3)
                handle._ds_before_training_step()
                with handle._observe_training_batch(args, kwargs):
                    loss = orig_step(*args, **kwargs)
                handle._ds_after_training_step()
                return loss
            with handle._observe_training_batch(args, kwargs):
                loss = orig_step(*args, **kwargs)
            if t.accelerator.sync_gradients:
                model = args[0] if args else kwargs["model"]
                handle._on_sync_step(model)
            return loss

        def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
            if handle._unlogged and (handle.last_stats is not None
                                     or getattr(handle, "last_activation", None) is not None):
                logs = dict(logs)
                logs.update(handle.log_values())
                handle._unlogged = False
                handle._window = None   # the next logging window starts here
            return orig_log(logs, *args, **kwargs)

        def _load_optimizer_and_scheduler(checkpoint: Any, *args: Any, **kwargs: Any) -> Any:
            out = orig_load(checkpoint, *args, **kwargs)
            if checkpoint is not None:
                handle._read_checkpoint(str(checkpoint))
            return out

        class AtaxCheckpointCallback(TrainerCallback):
            """Writes the atax reference state into each checkpoint folder; under DeepSpeed, attaches to the
            engine at train begin (after accelerator.prepare and the checkpoint load) and detaches at train end."""

            def on_save(self, args, state, control, **kwargs):
                handle._write_checkpoint(args, state)
                return control

            def on_train_begin(self, args, state, control, **kwargs):
                if handle.deepspeed:
                    handle._ds_begin()
                return control

            def on_train_end(self, args, state, control, **kwargs):
                if handle.deepspeed:
                    handle._ds_end()
                return control

        t.training_step = training_step
        t.log = log
        if orig_load is not None:
            t._load_optimizer_and_scheduler = _load_optimizer_and_scheduler
        self.callback = AtaxCheckpointCallback()
        t.add_callback(self.callback)
        t._atax_handle = self
        self._attached = True

    def detach(self) -> None:
        """Restore ``training_step``, ``log``, the checkpoint loader and the callbacks of the trainer."""
        if not self._attached:
            return
        t = self.trainer
        for name, value in self._saved.items():
            if value is _MISSING:
                t.__dict__.pop(name, None)
            else:
                setattr(t, name, value)
        if self.callback is not None:
            t.remove_callback(self.callback)
        if getattr(t, "_atax_handle", None) is self:
            del t._atax_handle
        self._remove_activation_hooks()
        self._ds_end()
        self._attached = False
        self._live = None

    @property
    def attached(self) -> bool:
        return self._attached

    # -- the step ------------------------------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        """The optimizer's parameters in ``param_groups`` order, read at every step (never cached)."""
        opt = self.trainer.optimizer
        if opt is None:
            raise RuntimeError("trainer.optimizer is None at a training step; atax needs the trainer's optimizer")
        return [p for g in opt.param_groups for p in g["params"]]

    def _on_sync_step(self, model: torch.nn.Module) -> None:
        """The last micro-batch of an accumulation window: the reference's step."""
        params = self._params()
        if isinstance(self.reference, ActivationSubspace):
            return self._activation_sync_step(params)
        return self._gradient_sync_step(model, params)

    def __repr__(self) -> str:
        sub = self.reference
        if isinstance(sub, ActivationSubspace):   # what runs: no gradient projection, so no mode/strength
            return (f"AtaxHandle(activation: energy={sub.energy:g}, contrast={sub.contrast:g}, "
                    f"refresh_every={self.refresh_every}, modules={len(sub._entries)}, steps={self.steps}, "
                    f"attached={self._attached})")
        return (f"AtaxHandle(mode={self.mode!r}, strength={self.strength}, granularity={self.granularity!r}, "
                f"reference={self.reference!r}, steps={self.steps}, attached={self._attached})")
