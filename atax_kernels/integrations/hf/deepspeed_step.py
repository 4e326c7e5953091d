"""The DeepSpeed ZeRO-1/2/3 path of :class:`~.handle.AtaxHandle`: under accelerate's DeepSpeed plugin the
Trainer's ``accelerator.backward(loss)`` calls ``engine.backward(loss)`` and then ``engine.step()`` on every
micro-batch, and the reduced gradients live in ZeRO's partitions, not in ``p.grad``. So nothing is projected at
the end of ``training_step``: at ``on_train_begin`` (after ``accelerator.prepare`` built the engine) the handle
calls :func:`atax_kernels.integrations.deepspeed.attach_engine` on ``trainer.model_wrapped`` with a
``reference_fn`` that draws the next capability batch and runs its forward through the engine (inside the
Trainer's ``compute_loss_context_manager``); the engine handle projects inside the ZeRO optimizer's ``step``.
After each ``training_step`` the engine handle's new statistics (global values, the same on every rank) join
the logging window; ``on_train_end`` detaches the engine handle.

Served: live capability references (batches, a ``(model) -> loss`` callable, ``CapabilitySource``) with
``refresh_every=1``, ``EMA`` references (the EMA kept partitioned in the engine handle, captured every
``refresh_every`` steps), ``Subspace`` references (sliced to each rank's partitions; aligned with the optimizer's
parameters, as on the other paths), and ``ActivationSubspace`` references (``attach_activation`` on the engine; the bases are
refreshed every ``refresh_every`` steps at the window's last micro-batch, before its forward); the rest is refused
at ``attach`` with what is missing (:func:`refuse`).
Checkpoints: the Trainer saves through ``model_wrapped.save_checkpoint`` (patched by ``attach_engine``: each
rank's ``atax_rank<r>.pt`` lands in the DeepSpeed tag folder) and the ``on_save`` callback writes the usual
per-rank file (step count, capability stream position). On resume the Trainer loads the engine's checkpoint
before ``on_train_begin``, so the state is read here: the per-rank HF file (via the wrapped
``_load_optimizer_and_scheduler``) and the engine handle's file (``deepspeed.checkpoint.load_state``, which also
checks the partition layout).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from ...activation import ActivationSubspace
from ...references.subspace import Subspace
from .ema import EMA
from .sources import CapabilitySource

__all__ = ["DeepSpeedStep", "refuse", "is_deepspeed"]


def is_deepspeed(trainer: Any) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


def _plugin_config(trainer: Any) -> dict:
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    plugin = getattr(state, "deepspeed_plugin", None)
    cfg = getattr(plugin, "deepspeed_config", None) or getattr(getattr(trainer, "args", None), "hf_deepspeed_config",
                                                                None)
    cfg = getattr(cfg, "config", cfg)
    return cfg if isinstance(cfg, dict) else {}


def refuse(trainer: Any, ref: Any, refresh_every: int) -> None:
    """What the DeepSpeed path does not serve yet, refused at ``attach`` with what is missing."""
    where = "atax attach() under DeepSpeed ZeRO"
    zero = _plugin_config(trainer).get("zero_optimization", {}) or {}
    if isinstance(ref, ActivationSubspace):
        from ..deepspeed.activation import refuse_entries

        refuse_entries(ref, where="by " + where)
        _refuse_stage_and_offload(where, zero, cpu_offload_ok=True)
        return
    if isinstance(ref, EMA):
        _refuse_stage_and_offload(where, zero)
        return
    if isinstance(ref, Subspace):
        _refuse_stage_and_offload(where, zero)
        return
    if not isinstance(ref, CapabilitySource):   # pragma: no cover - attach normalises references
        raise TypeError(f"{where}: unexpected reference {type(ref).__name__}")
    if refresh_every != 1:
        raise NotImplementedError(
            f"{where}: refresh_every={refresh_every} is not supported: the engine keeps no full gradient between "
            f"steps and its capability reference is captured in each accumulation window (reusing one needs it "
            f"kept partitioned across steps and checkpoints, not built); use refresh_every=1, or an EMA reference "
            f"(EMA(batches, beta=...): the EMA is kept partitioned and captured every refresh_every steps)")
    _refuse_stage_and_offload(where, zero)


def _refuse_stage_and_offload(where: str, zero: dict, cpu_offload_ok: bool = False) -> None:
    stage = zero.get("stage", None)
    if stage is not None and stage != "auto" and int(stage) not in (1, 2, 3):
        raise NotImplementedError(
            f"{where}: zero_optimization.stage={stage} is not supported: under stage 0 the reduced gradients are "
            f"in p.grad (DDP-like) but accelerate steps the engine inside backward; use ZeRO-1/2/3 or DDP")
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if cpu_offload_ok and str(device).lower() == "cpu":
            continue   # activation space reads the fp32 partition where it lives
        if str(device).lower() not in ("none", ""):
            raise NotImplementedError(
                f"{where}: zero_optimization.{key} (device={device}) is not supported: "
                + ("ZeRO takes the per-parameter gradient norms for clipping during backward, before the projection "
                   "runs, so it would clip with the unprojected norm" if key == "offload_optimizer" else
                   "untested (no CPU test covers it)")
                + f"; remove {key} (see docs/deepspeed.md)")


class DeepSpeedStep:
    """Mixin of :class:`~.handle.AtaxHandle`: the engine handle's life cycle inside ``trainer.train()``."""

    engine_handle: Any = None
    _ds_seen = 0
    _resume_dir: str | None = None

    def _ds_begin(self) -> None:
        """``on_train_begin``: attach to the engine ``accelerator.prepare`` built; apply a loaded state."""
        from ..deepspeed import attach_engine
        from ..deepspeed.checkpoint import load_state

        t = self.trainer
        engine = t.model_wrapped
        if type(engine).__name__ != "DeepSpeedEngine":
            raise RuntimeError(f"atax: the trainer uses DeepSpeed but trainer.model_wrapped is a "
                               f"{type(engine).__name__} at on_train_begin, not the DeepSpeedEngine")
        if self.engine_handle is not None:   # a second train() call on the same trainer
            self.engine_handle.detach()
        if isinstance(self.reference, ActivationSubspace):
            return self._ds_begin_activation(engine)
        if isinstance(self.reference, Subspace):
            return self._ds_begin_subspace(engine)
        ema = self.reference if isinstance(self.reference, EMA) else None
        source: CapabilitySource = ema.source if ema is not None else self.reference

        def reference_fn() -> torch.Tensor:
            ctx = getattr(t, "compute_loss_context_manager", None)
            with (ctx() if ctx is not None else contextlib.nullcontext()):
                loss = source.loss(engine, t.args.device)   # forward through the engine (ZeRO-3 gathers)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TypeError(f"the capability loss must be a scalar tensor, got "
                                f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))}")
            return loss

        # an EMA lives in the engine handle, partitioned like the gradient (ema.buffers stay empty)
        self.engine_handle = attach_engine(engine, reference_fn=reference_fn, mode=self.mode,
                                           strength=self.strength, granularity=self.granularity,
                                           backend=self.backend, ema_beta=None if ema is None else ema.beta,
                                           refresh_every=self.refresh_every if ema is not None else 1,
                                           reference_dtype=self.reference_dtype if ema is not None else None)
        state, self._resume_state = self._resume_state, None
        if state is not None:
            self.steps = int(state["steps"])
            if "source" in state:
                source.load_state_dict(state["source"])
        if self._resume_dir is not None:
            ds_state = None
            if os.path.isfile(os.path.join(self._resume_dir, "latest")):
                ds_state = load_state(self.engine_handle.partitions, self._resume_dir)  # checks the layout
            if ds_state is not None:
                if state is not None and int(ds_state["steps"]) != self.steps:
                    raise ValueError(f"atax: the checkpoint {self._resume_dir} holds step counts that disagree "
                                     f"({ds_state['steps']} in the DeepSpeed tag folder, {self.steps} in the "
                                     f"trainer's file)")
                self.steps = int(ds_state["steps"])
                if ema is not None and ds_state.get("ema") is not None:
                    h = self.engine_handle
                    h.ema = [t.to(h.partitions.device) for t in ds_state["ema"]]
                    h.ema_count = int(ds_state["ema_count"])
            self._resume_dir = None
        self.engine_handle.steps = self.steps
        self._ds_seen = self.steps

    def _ds_begin_subspace(self, engine: Any) -> None:
        """A Subspace reference: its basis vectors, aligned with the optimizer's parameters as on the other paths
        (``param_groups`` order, which ZeRO keeps), sliced to this rank's partitions as fixed references."""
        from ..deepspeed import attach_engine, partition_subspace
        from ..deepspeed.partitions import ZeroPartitions

        refs = partition_subspace(engine, self.reference, params=ZeroPartitions(engine).params)
        self.engine_handle = attach_engine(engine, reference=refs,
                                           mode=self.mode, strength=self.strength, granularity=self.granularity,
                                           backend=self.backend)
        state, self._resume_state = self._resume_state, None
        if state is not None:
            self.steps = int(state["steps"])
        self._resume_dir = None
        self.engine_handle.steps = self.steps
        self._ds_seen = self.steps

    def _ds_begin_activation(self, engine: Any) -> None:
        """An ActivationSubspace reference: the engine projects each realised update on its fp32 partitions."""
        from ..deepspeed import attach_activation

        self.engine_handle = attach_activation(engine, self.reference, backend=self.backend)
        if self._resume_state is not None:   # the per-rank file: the subspace's bases and moments, the step count
            self._apply_resume_state(self._params())
        self._resume_dir = None
        self.engine_handle.steps = self.steps
        self._ds_seen = self.steps

    def _ds_before_training_step(self) -> None:
        """An ActivationSubspace reference: on a window's last micro-batch (the engine steps inside it), refresh
        the bases when due, before the forward (the non-DeepSpeed path refreshes after the backward, on the same
        weights; with ``contrast`` > 0 this micro-batch's safety moments join the next refresh instead)."""
        sub = self.reference
        if not isinstance(sub, ActivationSubspace) or self.engine_handle is None:
            return
        if not self.trainer.accelerator.sync_gradients:
            return
        from ..deepspeed.partitions import extra_pass

        # only a refresh that runs is an extra pass: keep ZeRO-3's prefetch trace to the training passes
        self._refresh_activation_if_due(sub, around=lambda: extra_pass(self.engine_handle.engine))

    def _ds_after_training_step(self) -> None:
        """After ``training_step``: a step the engine projected joins the logging window."""
        h = self.engine_handle
        if h is None or h.steps == self._ds_seen:
            return
        self._ds_seen = self.steps = h.steps
        if isinstance(self.reference, ActivationSubspace):
            self.last_activation = h.last_stats
            self._unlogged = True
            self._window_add(self._activation_step_values(h.last_stats))
            return
        stats = h.last_stats
        if stats is None:   # an fp16 EMA step with no finite capture yet: not projected, nothing to log
            return
        ref_norm = h.last_ref_norm if h.last_ref_norm is not None else torch.zeros(
            stats.cosines.shape, dtype=torch.float64, device=stats.cosines.device)
        self.last_stats, self.last_ref_norm = stats, ref_norm
        self._unlogged = True
        self._window_add(self._step_values(stats, ref_norm), skipped=stats.skipped)

    def _ds_end(self) -> None:
        """``on_train_end``: undo the engine patch (the trainer keeps the engine)."""
        if self.engine_handle is not None:
            self.engine_handle.detach()
            self.engine_handle = None
