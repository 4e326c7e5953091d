"""Where a DeepSpeed ZeRO optimizer keeps each rank's reduced gradient partition, read as one list of local views.

Between the last ``engine.backward`` of an accumulation window and the optimizer update, every rank holds a
disjoint slice of the (averaged) flat gradient; ``ZeroPartitions.views()`` returns it as one tensor per trainable
parameter, in the same parameter order on every rank, each view the part of that parameter this rank owns (empty
when it owns none; ZeRO's alignment padding left out). Writing into a view writes into the buffer the optimizer
flattens for its update. The buffers (DeepSpeed 0.19.8, see docs/deepspeed.md):

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``): ``averaged_gradients[group]``, the list of pieces that ``step()``
  flattens into ``single_partition_of_fp32_groups[group].grad`` before it takes the norm, clips and updates (a
  ``GradPartitionBufferGroup`` over one flat buffer when gradients accumulate in fp32 for a 16-bit model).
  Pieces marked ``_zero_padding`` are padding; the others match ``params_in_partition[group]`` in order.
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): ``averaged_gradients[group][j]``, per parameter a view of the flat
  ``grad_partitions_flat_buffer`` (``safe_get_local_grad`` returns the same view); ``step()`` flattens them into
  ``fp32_partitioned_groups_flat[group].grad``. A parameter's partition is padded at the end on the last ranks.

``reset()`` returns the optimizer to the state a finished step leaves (no gradient, accumulation restarted), so
the next backward starts a fresh accumulation window: it is what ``step()`` itself does when it skips an
overflowed step.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

__all__ = ["PartitionedReference", "ZeroPartitions", "check_supported", "extra_pass"]

_STAGE12 = "DeepSpeedZeroOptimizer"
_STAGE3 = "DeepSpeedZeroOptimizer_Stage3"
#: The value ZeRO's ``step()`` resets ``micro_step_id`` to (stage_1_and_2.INITIAL_MICRO_STEP_ID).
_INITIAL_MICRO_STEP_ID = -1


def _cfg(engine: Any, name: str, default: Any = None) -> Any:
    fn = getattr(engine, name, None)
    return fn() if callable(fn) else default


def _offloaded(cfg: Any) -> bool:
    device = getattr(cfg, "device", None) if cfg is not None else None
    return device is not None and str(getattr(device, "value", device)).lower() not in ("none", "")


def check_supported(engine: Any, space: str = "gradient") -> None:
    """Raise (naming the option) for the DeepSpeed configurations the projection does not serve; ``space`` is
    ``"gradient"`` (attach_engine) or ``"activation"`` (attach_activation, which also serves CPU offload)."""
    if type(engine).__name__ == "PipelineEngine" or hasattr(engine, "train_batch") and hasattr(engine, "num_stages"):
        raise NotImplementedError("DeepSpeed pipeline parallelism (PipelineEngine) is not supported: the pipeline "
                                  "runs backward and step inside train_batch(), with no capability micro-step")
    opt = getattr(engine, "optimizer", None)
    stage = _cfg(engine, "zero_optimization_stage", 0)
    name = type(opt).__name__
    if name == "BF16_Optimizer":
        raise NotImplementedError(
            "DeepSpeed's BF16_Optimizer (ZeRO-1 or 0 with bf16 and data_types.grad_accum_dtype fp32) keeps the "
            "gradients in its own fp32 buffers, not in ZeRO's partitions: not supported; use ZeRO-2/3, or ZeRO-1 "
            "with bf16 gradient accumulation (the default)")
    if name not in (_STAGE12, _STAGE3):
        raise NotImplementedError(
            f"atax's DeepSpeed integration needs a ZeRO stage 1, 2 or 3 optimizer; this engine has zero_optimization."
            f"stage={stage} and optimizer {name}. Under stage 0 the reduced gradients are in p.grad: call "
            f"atax_kernels.project_ on [p.grad for p in engine.module.parameters()] between engine.backward and "
            f"engine.step, or use ZeRO-1/2/3")
    for key in ("zero_offload_optimizer", "zero_offload_param"):
        cfg = _cfg(engine, key)
        if not _offloaded(cfg):
            continue
        option = "zero_optimization." + key[len("zero_"):]
        device = str(getattr(getattr(cfg, "device", None), "value", getattr(cfg, "device", ""))).lower()
        if space == "activation":
            ratio = getattr(cfg, "ratio", 1.0)
            if ratio is not None and float(ratio) != 1.0:
                raise NotImplementedError(
                    f"{option}.ratio={ratio} is not supported for activation space: ZeRO-3 steps the sub-groups kept "
                    f"on the GPU with a second optimizer the projection does not wrap; use ratio 1.0")
            if device != "cpu":
                raise NotImplementedError(
                    f"{option} with device={device} is not supported for activation space: the fp32 partitions are "
                    f"swapped in and out around each sub-group's step; use device='cpu'")
            continue  # the realised update is read from the fp32 partition wherever it lives (tested on CPU)
        if key == "zero_offload_optimizer":
            raise NotImplementedError(
                "zero_optimization.offload_optimizer is not supported for gradient space: with the optimizer "
                "offloaded, ZeRO takes the per-parameter gradient norms for clipping (norm_for_param_grads) "
                "during backward, before a projection could run, so it would clip with the unprojected norm; "
                "remove offload_optimizer (activation space, attach_activation, supports device='cpu')")
        raise NotImplementedError("zero_optimization.offload_param is not supported for gradient space yet: "
                                  "untested (the gradient path is the same as without it, but no test covers it)")
    if not _cfg(engine, "managed_gradient_accumulation", True):
        raise NotImplementedError(
            "managed_gradient_accumulation=false is not supported: the capability micro-step is run as an "
            "accumulation-boundary backward, which that mode does not have (step() owns the boundary)")
    if _cfg(engine, "is_deepcompile_active", False):
        raise NotImplementedError("DeepCompile (compile.deepcompile) is not supported: it owns the gradient reduction")
    if getattr(opt, "zenflow", False):
        raise NotImplementedError("ZenFlow (zero_optimization.zenflow) is not supported: it steps on its own schedule")
    if "muon" in type(getattr(opt, "optimizer", None)).__name__.lower():
        raise NotImplementedError("the Muon optimizer is not supported: ZeRO replaces the gradient partition with the "
                                  "Muon update before step(), so there is no gradient left to project")
    if getattr(opt, "has_moe_layers", False) or getattr(engine, "has_moe_layers", False):
        raise NotImplementedError("MoE layers are not supported: expert parameters are reduced over an expert "
                                  "data-parallel group, so one Gram all-reduce cannot serve them")
    mp = getattr(opt, "model_parallel_group", None)
    if mp is not None and torch.distributed.get_world_size(mp) > 1:
        raise NotImplementedError("model/tensor parallelism (mpu) is not supported: a parameter sharded over the "
                                  "model-parallel group needs its dots summed there too, a replicated one must not")
    if getattr(engine, "sequence_parallel_size", 1) not in (None, 1):
        raise NotImplementedError("sequence parallelism is not supported")


class PartitionedReference:
    """A capability gradient in the engine's partition layout: this rank's part, one tensor per trainable
    parameter (see :meth:`ZeroPartitions.views`). Rank-specific: valid only for the engine that captured it."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors

    @property
    def numels(self) -> list[int]:
        return [t.numel() for t in self.tensors]


class ZeroPartitions:
    """The local gradient partition of a ZeRO-1/2/3 optimizer as per-parameter views, and its reset."""

    def __init__(self, engine: Any, space: str = "gradient") -> None:
        check_supported(engine, space)
        self.engine = engine
        self.opt = opt = engine.optimizer
        self.stage3 = type(opt).__name__ == _STAGE3
        if self.stage3:
            self.params = [p for group in opt.fp16_groups for p in group if p.requires_grad]
            groups = {id(opt._get_param_partition_group(p)): opt._get_param_partition_group(p) for p in self.params}
        else:
            self.params = [p for group in opt.bit16_groups for p in group if p.requires_grad]
            groups = {id(g): g for g in opt.real_dp_process_group}
        if len(groups) != 1:
            raise NotImplementedError("parameters partitioned over different process groups (MiCS, hpZ, expert "
                                      "groups) are not supported: one Gram all-reduce needs one partition group")
        (self.group,) = groups.values()
        self._index = {id(p): i for i, p in enumerate(self.params)}

    @property
    def device(self) -> torch.device:
        """Where the reduced gradient partition lives (the fp32 master's device: gradient space refuses
        offload; activation space keeps its exchange buffers there too)."""
        opt = self.opt
        return opt.grad_partitions_flat_buffer.device if self.stage3 else opt.single_partition_of_fp32_groups[0].device

    # --- reading --------------------------------------------------------------------------------------

    def views(self) -> list[torch.Tensor]:
        """This rank's reduced gradient, one view per trainable parameter (empty where it owns nothing)."""
        return self._views3() if self.stage3 else self._views12()

    def _empty(self, p: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
        dtype = like.dtype if like is not None else getattr(self.opt, "gradient_accumulation_dtype", p.dtype)
        device = like.device if like is not None else p.device
        return torch.empty(0, dtype=dtype, device=device)

    def _views12(self) -> list[torch.Tensor]:
        opt = self.opt
        out: list[torch.Tensor | None] = [None] * len(self.params)
        like = None
        for i, params in enumerate(opt.params_in_partition):
            pieces = opt.averaged_gradients.get(i)
            if pieces is None:
                raise RuntimeError("ZeRO holds no reduced gradient: the projection runs in engine.step() after the "
                                   "accumulation boundary's engine.backward(loss)")
            # Pieces follow params_in_partition in order; padding is marked _zero_padding, except the trailing
            # zeros of the unpadded layout, which come after the last parameter's piece.
            real = [t for t in pieces if not getattr(t, "_zero_padding", False)]
            if len(real) < len(params):
                raise RuntimeError(f"unexpected ZeRO gradient layout in group {i}: {len(real)} gradient pieces for "
                                   f"{len(params)} parameters in this partition (DeepSpeed version not supported?)")
            for p, t in zip(params, real):
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is not None and mapping.hp_fragment_address.numel != t.numel():
                    raise RuntimeError(f"unexpected ZeRO gradient layout: a piece of {t.numel()} elements for a "
                                       f"fragment of {mapping.hp_fragment_address.numel}")
                if id(p) in self._index:
                    out[self._index[id(p)]] = t
                    like = t
        return [t if t is not None else self._empty(p, like) for p, t in zip(self.params, out)]

    def _views3(self) -> list[torch.Tensor]:
        opt = self.opt
        out = []
        for i, group in enumerate(opt.fp16_groups):
            pieces = opt.averaged_gradients.get(i) if isinstance(opt.averaged_gradients, dict) else None
            if pieces is None:
                raise RuntimeError("ZeRO-3 holds no reduced gradient: the projection runs in engine.step() after "
                                   "engine.backward(loss)")
            for p, t in zip(group, pieces):
                if not p.requires_grad:
                    continue
                rank = opt._get_param_partition_rank(p)
                size = p.partition_numel()
                real = max(0, min(size, p.ds_numel - rank * size))  # the last ranks' partitions end in padding
                out.append(t.view(-1).narrow(0, 0, real))
        return out

    def numels(self) -> list[int]:
        """The sizes ``views()`` has, known without a gradient (for checking a loaded reference)."""
        if self.stage3:
            out = []
            for p in self.params:
                size = p.partition_numel()
                out.append(max(0, min(size, p.ds_numel - self.opt._get_param_partition_rank(p) * size)))
            return out
        return [m.hp_fragment_address.numel if (m := getattr(p, "_hp_mapping", None)) is not None else 0
                for p in self.params]

    def fragment(self, p: torch.Tensor) -> tuple[int, int]:
        """``(start, numel)``: the range of the flattened parameter ``p`` whose reduced gradient this rank holds
        (the element order of :meth:`views`; ``numel`` 0 where it holds none)."""
        if self.stage3:
            size = p.partition_numel()
            rank = self.opt._get_param_partition_rank(p)
            return rank * size, max(0, min(size, p.ds_numel - rank * size))
        m = getattr(p, "_hp_mapping", None)
        return (0, 0) if m is None else (m.lp_fragment_address.start, m.lp_fragment_address.numel)

    # --- resetting ------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Drop the reduced gradient and restart accumulation, as ZeRO's ``step()`` does for an overflowed step."""
        opt = self.opt
        if self.stage3:
            opt.zero_grad(set_to_none=True)  # micro_step_id = 0: the next backward copies into the buffer
            opt.grad_partitions_flat_buffer.zero_()  # a parameter without a next gradient must not keep this one
            return
        opt.zero_grad(set_to_none=True)
        release = getattr(opt, "_release_preflattened_grad_buffers", None)
        if callable(release):
            release()
        for k in list(opt.averaged_gradients.keys()):
            opt.averaged_gradients[k] = None
        all_grads = getattr(opt, "all_grad_tensors", None)
        if isinstance(all_grads, dict):
            for k in list(all_grads.keys()):
                all_grads[k] = None
        opt.micro_step_id = _INITIAL_MICRO_STEP_ID


@contextlib.contextmanager
def extra_pass(engine: Any) -> Iterator[None]:
    """Around a forward (and backward) through a ZeRO-3 engine that is not the training pass: the capability
    micro-step, a basis refresh. ZeRO-3 records the module order of the first pass after ``reset_step()`` and
    prefetches and *releases* parameters by that trace afterwards; a trace recorded from such an extra pass (a
    different module order, or a forward without backward) left the next training backward holding a released
    parameter ("The size of tensor a (0) must match ...", seen through the HF Trainer with prefetching on).
    The trace is invalidated before (so the extra pass records rather than prefetches by a trace it does not
    follow) and after (so the next training pass records its own). With a capture every step, training passes
    then never reach a complete trace: prefetching is effectively off under ZeRO-3 with ``reference_fn``
    (refresh_every > 1 with an EMA, or a fixed reference, keeps it on between captures). Nothing for ZeRO-1/2."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    get = getattr(offload, "get_param_coordinator", None)
    coordinator = get() if callable(get) else None

    def invalidate() -> None:
        if coordinator is not None and not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()

    invalidate()  # the extra pass itself must not prefetch (and release) by the training pass's trace
    try:
        yield
    finally:
        invalidate()
