"""``attach_engine``: gradient projection inside a DeepSpeed ZeRO-1/2/3 engine, on its own partitioned buffers.

The reference is computed first and kept partitioned: at the start of each accumulation window (lazily, in the
window's first ``engine.backward``, or explicitly with :meth:`EngineHandle.capture`), the capability loss is
back-propagated through the engine as an accumulation-boundary micro-step, so ZeRO reduces it into the same
partition layout the safety gradient will have; this rank's partition is cloned as the reference and the
optimizer's gradient state is reset as after a step. The safety backward(s) then accumulate from zero, and the
ZeRO optimizer's ``step`` (patched on the instance) projects the reduced safety partition against the reference
before it takes the gradient norm, clips and updates: local partial Gram -> ``all_reduce(SUM)`` over the
partition group -> the same solve on every rank -> ``combine_`` in place (``projection.core.project_resolved``).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ... import _validate as validate
from ...distributed import gram_all_reducer
from ...ops.registry import resolve
from ...projection.core import GRANULARITIES, MODES, project_resolved
from ...projection.stats import ProjectionStats
from .checkpoint import load_state, loaded_tag, save_state
from .partitions import PartitionedReference, ZeroPartitions, extra_pass

if TYPE_CHECKING:  # annotations only
    from ...activation import ActivationSubspace
    from .activation import ActivationEngineHandle

__all__ = ["attach_engine", "capture_reference", "partition_subspace", "EngineHandle", "PartitionedReference"]


def _patched(original: Callable[..., Any], impl: Callable[..., Any]) -> Callable[..., Any]:
    """``impl`` under ``original``'s name and signature (the HF Trainer inspects save_checkpoint's parameters)."""
    @functools.wraps(original)
    def patched(*args: Any, **kwargs: Any) -> Any:
        return impl(*args, **kwargs)

    return patched


class EngineHandle:
    """What :func:`attach_engine` returns: the patched engine's projection state. ``detach()`` undoes the patch.

    Attributes:
        last_stats: :class:`~atax_kernels.ProjectionStats` of the last projected step (global values, the same
            on every rank), or None.
        steps: optimizer steps projected so far.
        last_ref_norm: ``[k]`` float64 tensor, the global norms of the references of the last projected step
            (from the all-reduced Gram's diagonal: no extra pass or collective), or None.
    """

    def __init__(self, engine: Any, reference_fn: Callable[[], torch.Tensor] | None,
                 reference: PartitionedReference | Sequence[PartitionedReference] | None,
                 mode: str, strength: float, granularity: str, backend: str | None,
                 ema_beta: float | None = None, refresh_every: int = 1,
                 reference_dtype: torch.dtype | None = None) -> None:
        if (reference_fn is None) == (reference is None):
            raise ValueError("give exactly one of reference_fn (a callable returning the capability loss, run once "
                             "per optimizer step) and reference (PartitionedReference(s) from capture_reference())")
        if reference_fn is not None and not callable(reference_fn):
            raise TypeError(f"reference_fn must be callable, got {type(reference_fn).__name__}")
        if ema_beta is not None:
            if isinstance(ema_beta, bool) or not isinstance(ema_beta, (int, float)) or not 0.0 <= ema_beta < 1.0:
                raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta!r}")
            if reference_fn is None:
                raise ValueError("ema_beta needs reference_fn: the EMA folds the captured capability gradients")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be an int >= 1, got {refresh_every!r}")
        if refresh_every > 1 and ema_beta is None:
            raise ValueError(f"refresh_every={refresh_every} needs ema_beta: a live reference is captured every "
                             f"step; one reused between captures is an EMA (ema_beta=0.0 keeps the last capture)")
        self.ema_beta = None if ema_beta is None else float(ema_beta)
        self.refresh_every = refresh_every
        self.ema: list[torch.Tensor] | None = None   # this rank's partition of the EMA of the captures
        self.ema_count = 0
        if reference_dtype is not None and (not isinstance(reference_dtype, torch.dtype)
                                            or not reference_dtype.is_floating_point):
            raise TypeError(f"reference_dtype must be a floating torch.dtype, got {reference_dtype!r}")
        self.reference_dtype = reference_dtype
        self._capture_overflowed = False
        self.mode = validate.check_choice(mode, "mode", MODES)
        self.granularity = validate.check_choice(granularity, "granularity", GRANULARITIES)
        self.alpha = validate.check_strength(strength)
        self.backend = backend
        self.engine = engine
        self.partitions = ZeroPartitions(engine)
        self.reference_fn = reference_fn
        if reference is not None:
            refs = [reference] if isinstance(reference, PartitionedReference) else list(reference)
            if not refs or not all(isinstance(r, PartitionedReference) for r in refs):
                raise TypeError("reference must be a PartitionedReference (from handle.capture()) or a list of them")
            self._static: list[PartitionedReference] | None = refs
        else:
            self._static = None
        self._pending: PartitionedReference | None = None  # the live reference of the current window
        self._window_open = False  # a safety backward has run since the last optimizer step
        self._capturing = False
        reduce = gram_all_reducer(self.partitions.group)

        def reduce_and_keep(grams: torch.Tensor) -> torch.Tensor:
            self._last_grams = reduce(grams)   # global Gram(s): the reference norms come from its diagonal
            return self._last_grams

        self._reduce = reduce_and_keep
        self._last_grams: torch.Tensor | None = None
        self.last_stats: ProjectionStats | None = None
        self.last_ref_norm: torch.Tensor | None = None
        self.steps = 0
        opt = engine.optimizer
        self._saved = {name: obj.__dict__.get(attr) for name, obj, attr in self._patch_targets()}
        self._orig_step = opt.step
        self._orig_backward = engine.backward
        if engine.__dict__.get("_atax_handle") is not None:
            raise RuntimeError("this engine is already attached: call detach() on its handle first")
        self._orig_save = engine.save_checkpoint
        self._orig_load = engine.load_checkpoint
        opt.step = _patched(self._orig_step, self._step)
        engine.backward = _patched(self._orig_backward, self._backward)
        engine.save_checkpoint = _patched(self._orig_save, self._save_checkpoint)
        engine.load_checkpoint = _patched(self._orig_load, self._load_checkpoint)
        engine.__dict__["_atax_handle"] = self

    def _patch_targets(self) -> list[tuple[str, Any, str]]:
        e = self.engine
        return [("step", e.optimizer, "step"), ("backward", e, "backward"), ("save", e, "save_checkpoint"),
                ("load", e, "load_checkpoint")]

    def detach(self) -> None:
        """Restore the engine's ``backward`` and the optimizer's ``step``; the handle stops projecting."""
        for name, obj, attr in self._patch_targets():
            if self._saved[name] is None:
                obj.__dict__.pop(attr, None)
            else:
                setattr(obj, attr, self._saved[name])
        self.engine.__dict__.pop("_atax_handle", None)
        self._pending = None

    # --- the capability micro-step --------------------------------------------------------------------

    def capture(self, loss_fn: Callable[[], torch.Tensor] | None = None) -> PartitionedReference:
        """Back-propagate a capability loss through the engine, keep this rank's reduced partition, reset.

        Call before the window's first ``engine.backward`` (or let the handle call it there with
        ``reference_fn``): the reset discards any gradient accumulated so far. With ``reference_fn`` the result
        is this window's reference; with ``loss_fn`` (any attach mode) it is returned, e.g. to build a static
        ``reference=``. A collective call: every rank must make it.
        """
        fn = loss_fn if loss_fn is not None else self.reference_fn
        if fn is None:
            raise ValueError("capture() needs loss_fn: this handle was attached with a static reference")
        if self._window_open:
            raise RuntimeError("capture() after engine.backward in the same accumulation window would discard the "
                               "safety gradient accumulated so far: capture first, then the safety backward(s)")
        self._capturing = True
        try:
            ref = _capture(self.engine, self.partitions, fn, self._orig_backward)
        finally:
            self._capturing = False
        if loss_fn is None:
            self._pending = ref
            self._check_capture(ref)
            if self.ema_beta is not None and not self._capture_overflowed:
                self._fold(ref)
        return ref

    def _refresh_due(self) -> bool:
        # an EMA with nothing folded yet (e.g. fp16's first, overflowing captures) captures at every step
        return self.steps % self.refresh_every == 0 or (self.ema_beta is not None and self.ema is None)

    def _global_sq_norm(self, ref: PartitionedReference) -> float:
        """The capture's squared norm over every rank (one scalar all-reduce): the same verdict everywhere."""
        device = self.partitions.device
        local = sum((t.double() ** 2).sum() for t in ref.tensors) if ref.tensors else torch.zeros((), device=device)
        total = torch.as_tensor(local, dtype=torch.float64, device=device).reshape(1).clone()
        if torch.distributed.get_backend(self.partitions.group) == "nccl":
            total = total.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(total, group=self.partitions.group)
        return float(total)

    def _check_capture(self, ref: PartitionedReference) -> None:
        """A non-finite capture: under fp16 (loss scaling) an overflow, so this step is made to overflow too (ZeRO
        then skips it and lowers the loss scale; projecting against it, or stepping unprojected, would be wrong);
        without a loss scaler an error."""
        if math.isfinite(self._global_sq_norm(ref)):
            return
        if getattr(self.engine.optimizer, "dtype", None) == torch.float16:
            self._capture_overflowed = True
            return
        raise RuntimeError("the capability loss's gradient is not finite (no fp16 loss scaler to skip the step): "
                           "check reference_fn's loss")

    def _fold(self, ref: PartitionedReference) -> None:
        """EMA mode: fold this capture into the partitioned EMA when its global squared norm is finite and not
        zero (every rank takes the same decision: the norm is all-reduced)."""
        from ...references.ema import capture_verdict, fold_ema_

        device = self.partitions.device
        if capture_verdict(self._global_sq_norm(ref)) != "fold":
            return
        if self.ema is None:
            self.ema = [None] * len(ref.tensors)  # type: ignore[list-item]
        # fp16 engines scale every backward by the dynamic loss scale, which changes between captures: fold
        # unscaled captures (orthogonal projection itself does not care about the scale)
        scale = float(getattr(self.engine.optimizer, "loss_scale", 1.0) or 1.0)
        # 16-bit captures are averaged in fp32 unless reference_dtype says otherwise: an unscaled fp16 gradient
        # underflows and (1 - beta) g steps vanish in bf16 rounding
        dtype = self.reference_dtype or (torch.float32 if ref.tensors and ref.tensors[0].dtype in (
            torch.float16, torch.bfloat16) else None)
        fold_ema_(self.ema, list(ref.tensors), first=self.ema_count == 0, beta=self.ema_beta,  # type: ignore[arg-type]
                  inv_scale=1.0 / scale, dtype=dtype)
        self.ema_count += 1

    @property
    def capture_due(self) -> bool:
        """A live reference is to be captured before this window's first backward (none captured yet, no safety
        backward run since the last step). The HF path calls :meth:`capture` then, *before* the safety forward:
        under ZeRO-3 a capability forward + backward between the safety forward and its backward leaves some
        parameters released for that backward (seen with a Llama model through the HF Trainer)."""
        return (self.reference_fn is not None and self._pending is None and not self._window_open
                and not self._capturing and self._refresh_due())

    # --- the patched methods --------------------------------------------------------------------------

    def _backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.capture_due:
            self.capture()
        out = self._orig_backward(loss, *args, **kwargs)
        if not self._capturing:
            self._window_open = True
        return out

    def _step(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if self._capture_overflowed:
                # fp16: the capture overflowed; make ZeRO's overflow check see it in the safety gradient too, so
                # it skips the step and lowers the loss scale (the next window captures again)
                for t in self.partitions.views():
                    t.fill_(float("inf"))
                self.last_stats = None
                self.steps += 1
            else:
                self._project()
        finally:
            self._pending = None
            self._window_open = False
            self._capture_overflowed = False
        return self._orig_step(*args, **kwargs)

    def _save_checkpoint(self, save_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        """The engine's checkpoint, then this rank's handle state in the same tag folder (checkpoint.py)."""
        tag = f"global_step{self.engine.global_steps}" if tag is None else str(tag)  # DeepSpeed's default tag
        out = self._orig_save(save_dir, tag, *args, **kwargs)
        save_state(self, save_dir, tag)
        return out

    def _load_checkpoint(self, load_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        """The engine's checkpoint, then this rank's handle state when the checkpoint has one."""
        out = self._orig_load(load_dir, tag, *args, **kwargs)
        if isinstance(out, tuple) and out and out[0] is None:
            return out  # DeepSpeed found nothing to load
        if tag is None:  # the tag DeepSpeed resolved ("latest", or "latest_universal" for universal checkpoints)
            tag = loaded_tag(load_dir, out)
        state = load_state(self.partitions, load_dir, tag)
        if state is not None:
            self.steps = state["steps"]
            if self.ema_beta is not None:  # the checkpoint's EMA, or none (not the one in memory)
                saved = state.get("ema")
                self.ema = None if saved is None else [t.to(self.partitions.device) for t in saved]
                self.ema_count = int(state.get("ema_count", 0)) if saved is not None else 0
            if self._static is not None and state["references"] is not None:
                self._static = [PartitionedReference([t.to(self.partitions.device) for t in r])
                                for r in state["references"]]
        self._pending = None
        self._window_open = False
        return out

    def _project(self) -> None:
        if self.ema_beta is not None:
            if self.ema is None:
                if self.ema_count == 0 and self._pending is not None:
                    # captured, but all zero (non-finite captures skip the step, see _step): the capability
                    # gradient has no direction to protect, so there is nothing to project yet
                    warnings.warn("atax DeepSpeed EMA: this step's capability gradient is all zero and no earlier "
                                  "one was folded: nothing to project against (the next window captures again)",
                                  RuntimeWarning, stacklevel=2)
                    self.last_stats = None
                    self.steps += 1
                    return
                raise RuntimeError("no capability reference for this step: no capture has been folded into the EMA "
                                   "yet (none was taken: the window's first engine.backward(loss) takes it)")
            refs = [PartitionedReference(self.ema)]
        else:
            refs = self._static if self._static is not None else (
                [self._pending] if self._pending is not None else [])
        if not refs:
            raise RuntimeError("no capability reference for this step: the reference is captured in the window's "
                               "first engine.backward(loss) (or by handle.capture() before it); was loss.backward() "
                               "called directly instead of engine.backward(loss)?")
        grads = self.partitions.views()
        if [g.numel() for g in grads] != self.partitions.numels():
            raise RuntimeError("unexpected ZeRO gradient layout: the partition views do not have the sizes of the "
                               "parameters' fragments (DeepSpeed version not supported?)")
        for j, ref in enumerate(refs):
            if ref.numels != [g.numel() for g in grads]:
                raise ValueError(f"reference[{j}] does not match this engine's gradient partition layout "
                                 f"(captured on another engine, rank or model?)")
        # references sliced from full tensors (partition_subspace) are flat; ZeRO-1/2 pieces can keep the
        # parameter's shape: the same elements in the same order, so a view lines them up
        ref_lists = [[t if t.shape == g.shape else t.view(g.shape) for t, g in zip(r.tensors, grads)] for r in refs]
        dtypes = {t.dtype for lst in [grads, *ref_lists] for t in lst}
        impl = resolve(self.backend, self.partitions.device, dtypes)
        self.last_stats = project_resolved(impl, grads, ref_lists, self.mode, self.alpha, self.granularity,
                                           reduce_grams=self._reduce)
        grams = self._last_grams
        if grams is not None:
            total = grams.sum(0) if grams.dim() == 3 else grams    # tensor granularity: [n, k+1, k+1]
            self.last_ref_norm = torch.diagonal(total)[1:].to(torch.float64).clamp_min(0).sqrt()
        self.steps += 1


def _capture(engine: Any, partitions: ZeroPartitions, loss_fn: Callable[[], torch.Tensor],
             backward: Callable[..., Any]) -> PartitionedReference:
    """The capability micro-step: an accumulation-boundary backward, a clone of this rank's partition, a reset."""
    saved = engine._is_gradient_accumulation_boundary
    try:
        with torch.enable_grad(), extra_pass(engine):
            loss = loss_fn()
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
                raise TypeError("the capability loss must be a scalar tensor attached to autograd")
            # An accumulation-boundary micro-step, so ZeRO finishes the reduction into its partition buffers.
            engine.set_gradient_accumulation_boundary(True)
            backward(loss, scale_wrt_gas=False)
        return PartitionedReference([t.detach().clone() for t in partitions.views()])
    finally:
        engine._is_gradient_accumulation_boundary = saved
        engine.optimizer.set_gradient_accumulation_boundary(engine.is_gradient_accumulation_boundary())
        partitions.reset()


def partition_subspace(engine: Any, subspace: Any,
                       params: Sequence[torch.Tensor] | None = None) -> list[PartitionedReference]:
    """A :class:`~atax_kernels.Subspace` (full-parameter basis vectors) as this rank's fixed references, for
    ``attach_engine(engine, reference=partition_subspace(engine, subspace))``: each basis vector sliced to the
    part of the gradient this rank holds. ``params``: the parameters the subspace's tensors are aligned with
    (default: the trainable parameters of ``engine.module`` in model order; shapes are checked, ZeRO-3's real
    shapes read from ``ds_shape``). The projection solves with the references' all-reduced Gram, so a basis kept
    in bf16 is handled exactly too. Memory: ``rank`` copies of the rank's partition (the full basis is the
    caller's)."""
    from ...references.subspace import Subspace

    if not isinstance(subspace, Subspace):
        raise TypeError(f"subspace must be an atax_kernels.Subspace, got {type(subspace).__name__}")
    if subspace.rank == 0:
        raise ValueError("the Subspace is empty (rank 0): add directions first")
    partitions = ZeroPartitions(engine)
    aligned = list(params) if params is not None else [p for p in engine.module.parameters() if p.requires_grad]
    if len(aligned) != len(subspace.shapes):
        raise ValueError(f"the Subspace covers {len(subspace.shapes)} tensors but {len(aligned)} parameters were "
                         f"given (default: engine.module's trainable parameters in model order)")
    index = {}
    for i, (p, shape) in enumerate(zip(aligned, subspace.shapes)):
        real = tuple(getattr(p, "ds_shape", None) or p.shape)
        if real != tuple(shape):
            raise ValueError(f"the Subspace's tensor {i} has shape {tuple(shape)}, parameter {i} has {real}")
        index[id(p)] = i
    missing = [j for j, p in enumerate(partitions.params) if id(p) not in index]
    if missing:
        raise ValueError(f"{len(missing)} parameter(s) the ZeRO optimizer trains are not covered by the Subspace's "
                         f"parameters (the first is number {missing[0]} of the optimizer's)")
    dtype = getattr(partitions.opt, "gradient_accumulation_dtype", torch.float32)
    out = []
    for vec in subspace.basis:
        parts = []
        for p in partitions.params:
            start, numel = partitions.fragment(p)
            t = vec[index[id(p)]].reshape(-1).narrow(0, start, numel)
            parts.append(t.to(device=partitions.device, dtype=dtype, copy=True))
        out.append(PartitionedReference(parts))
    return out


def capture_reference(engine: Any, loss_fn: Callable[[], torch.Tensor]) -> PartitionedReference:
    """This rank's partition of the gradient of ``loss_fn()`` (a capability loss through the engine), for
    ``attach_engine(engine, reference=...)``: a fixed reference. Discards any gradient the engine holds, so call
    it before a window's first ``engine.backward``. A collective call: every rank must make it."""
    handle = engine.__dict__.get("_atax_handle")
    if handle is not None:
        return handle.capture(loss_fn)
    return _capture(engine, ZeroPartitions(engine), loss_fn, engine.backward)


def attach_engine(
    engine: Any,
    reference_fn: Callable[[], torch.Tensor] | None = None,
    *,
    reference: PartitionedReference | Sequence[PartitionedReference] | "ActivationSubspace" | None = None,
    mode: str = "orthogonal",
    strength: float = 1.0,
    granularity: str = "global",
    backend: str | None = None,
    ema_beta: float | None = None,
    refresh_every: int = 1,
    reference_dtype: torch.dtype | None = None,
) -> "EngineHandle | ActivationEngineHandle":
    """Project the safety gradient of a DeepSpeed ZeRO-1/2/3 engine off a capability gradient at every step.

    One call after ``deepspeed.initialize``; the loop stays as it is::

        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        handle = attach_engine(engine, reference_fn=lambda: capability_loss(engine, next(cap_batches)))
        for batch in loader:
            loss = safety_loss(engine, batch)
            engine.backward(loss)   # the window's first backward first runs reference_fn's backward
            engine.step()           # projects the reduced safety partition, then clips and updates

    Args:
        engine: a ``DeepSpeedEngine`` with ``zero_optimization.stage`` 1, 2 or 3.
        reference_fn: a callable taking no argument and returning the capability loss (forward through the
            engine). Run once per optimizer step, at the first ``engine.backward`` of the accumulation window
            (one extra forward + backward per step; one clone of the rank's gradient partition in memory).
        reference: instead, fixed reference(s): ``PartitionedReference`` objects from
            :func:`capture_reference` (this rank's partition; the same engine). Or an
            :class:`~atax_kernels.ActivationSubspace`: activation-space projection of the realised update
            (:func:`~.activation.attach_activation`; mode, strength and granularity do not apply).
        mode, strength, granularity, backend: as in :func:`atax_kernels.project_`.
        ema_beta: with ``reference_fn``: project against an exponential moving average of the captures instead
            of the last one (``e <- beta e + (1 - beta) g``, the first copied; non-finite or all-zero captures
            skipped), kept partitioned like the gradient (one more copy of the rank's partition) and saved in
            the checkpoints.
        refresh_every: with ``ema_beta``: capture (one extra forward + backward) only every this many steps and
            project against the EMA in between.
        reference_dtype: the EMA's dtype (default: float32 for 16-bit gradients, else the gradient's).

    A capture whose gradient is not finite makes an fp16 engine skip the step (its overflow check sees the
    safety partition filled with inf and lowers the loss scale); without a loss scaler it is an error.

    ``engine.save_checkpoint``/``load_checkpoint`` (patched too) carry the handle's per-rank state (fixed
    references, step count) in the checkpoint's tag folder; see checkpoint.py.

    Every rank must attach and call ``engine.backward``/``engine.step`` the same way (the Gram is all-reduced
    over the data-parallel group in ``engine.step()``). Refused with the option's name: offload_optimizer,
    offload_param, pipeline/tensor/sequence parallelism, MoE, Muon, ZenFlow, DeepCompile,
    ``managed_gradient_accumulation=false``. See docs/deepspeed.md.
    """
    from ...activation import ActivationSubspace

    if isinstance(reference, ActivationSubspace):
        if reference_fn is not None:
            raise ValueError("reference=ActivationSubspace takes no reference_fn: refresh its bases with "
                             "atax_kernels.activation.apply.refresh(subspace, forward) on every rank")
        from .activation import attach_activation

        return attach_activation(engine, reference, backend=backend)
    return EngineHandle(engine, reference_fn, reference, mode, strength, granularity, backend, ema_beta,
                        refresh_every, reference_dtype)
