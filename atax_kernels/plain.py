"""``project_model_``: the one-call entry point for plain PyTorch / accelerate training loops (between the safety
backward and gradient clipping). Distributed reductions come from :mod:`atax_kernels.distributed`."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ._gradstash import GradStash
from .distributed import gram_all_reducer, has_dtensor
from .projection import ProjectionStats, project_impl
from .references.subspace import Subspace

__all__ = ["project_model_"]


def _refuse_unsupported(params_obj: Any, params: list[torch.Tensor], accelerator: Any, process_group: Any) -> None:
    dtype = str(getattr(accelerator, "distributed_type", "")) if accelerator is not None else ""
    if dtype.upper().endswith("DEEPSPEED") or type(params_obj).__name__ == "DeepSpeedEngine" or any(
        hasattr(p, "ds_id") or hasattr(p, "ds_tensor") for p in params
    ):
        raise NotImplementedError(
            "project_model_ does not serve DeepSpeed ZeRO: ZeRO keeps the reduced gradients in partitioned flat "
            "buffers owned by the engine, not in param.grad, and steps inside engine.step(). Use "
            "atax_kernels.integrations.deepspeed.attach_engine(engine, reference_fn=...) once after "
            "deepspeed.initialize (it projects each rank's partition inside engine.step(); ZeRO-1/2/3), or "
            "atax_kernels.hf.attach(trainer, ...) with a Trainer; see docs/deepspeed.md."
        )
    if (process_group is None and dtype.upper().endswith("FSDP") and not getattr(accelerator, "is_fsdp2", False)
            and not has_dtensor([p.grad for p in params if p.grad is not None], [])):
        raise ValueError(
            "accelerate FSDP1 keeps each rank's shard of the gradient in plain tensors: pass "
            "process_group=<the FSDP sharding group> so dot products are summed across shards, or use "
            "fsdp_version=2 (DTensor gradients: automatic). Under NO_SHARD the gradients are full: call "
            "atax_kernels.project_ on them directly"
        )
    if process_group is None and any(getattr(p, "_is_flat_param", False) for p in params):
        raise ValueError(
            "these are FSDP1 flat parameters, whose .grad holds only this rank's shard: pass "
            "process_group=<the FSDP sharding group> so dot products are summed across shards (or use FSDP2)"
        )


def _select_reference(reference: Any, keep: list[int], n: int) -> Any:
    """Restrict a reference given for all ``n`` params to the positions in ``keep``."""
    if isinstance(reference, Subspace):
        if len(reference.shapes) != n:
            raise ValueError(f"reference Subspace has {len(reference.shapes)} tensors but there are {n} parameters")
        if len(keep) == n:
            return reference
        if reference.rank == 0:
            return reference  # project_ explains the empty subspace
        # A basis restricted to some tensors is no longer orthonormal: solve with its Gram instead.
        return [[vec[i] for i in keep] for vec in reference.basis]
    if isinstance(reference, torch.Tensor):
        reference = [reference]
    if not isinstance(reference, (list, tuple)) or len(reference) == 0:
        raise TypeError(
            "reference must be a list of tensors parallel to params (captured capability gradients), a list of "
            f"such lists, a Subspace, or a callable returning a capability loss; got {type(reference).__name__}"
        )
    nested = all(isinstance(r, (list, tuple)) for r in reference)
    lists = [list(r) for r in reference] if nested else [list(reference)]
    out = []
    for j, lst in enumerate(lists):
        label = f"reference[{j}]" if nested else "reference"
        if len(lst) != n:
            raise ValueError(f"{label} has {len(lst)} tensors but there are {n} parameters")
        out.append([lst[i] for i in keep])
    return out if nested else out[0]


def project_model_(
    params: Iterable[torch.Tensor] | torch.nn.Module,
    reference: Any,
    *,
    accelerator: Any = None,
    mode: str = "orthogonal",
    strength: float = 1.0,
    granularity: str = "global",
    backend: str | None = None,
    process_group: Any = None,
) -> ProjectionStats:
    """Project the safety gradients held in ``p.grad`` away from a capability reference, in place.

    One call between the safety backward and gradient clipping of a plain PyTorch / accelerate loop::

        loss_safety.backward()                  # or accelerator.backward(loss_safety)
        stats = project_model_(model.parameters(), lambda: capability_loss(model, cap_batch))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(); optimizer.zero_grad()

    Args:
        params: parameters (or a module). Parameters whose ``.grad`` is None are left out.
        reference: the capability direction(s):

            * a list of tensors parallel to ``params`` (captured capability gradients; None entries count as
              zero), or a list of such lists (several references);
            * a :class:`~atax_kernels.Subspace` over ``params``;
            * a callable taking no argument and returning a capability loss. The safety gradients are set
              aside (without a copy; cloned only when they are views of a DDP bucket), the loss is
              back-propagated (through ``accelerator.backward`` when given, so its scaling and gradient
              synchronisation apply), the resulting gradients become the reference, and the safety
              gradients are put back before projecting. Costs one forward + backward.
        accelerator: an ``accelerate.Accelerator`` (used for the callable's backward only).
        mode, strength, granularity, backend: as in :func:`atax_kernels.project_`.
        process_group: only for plain-tensor gradients that are disjoint shards of one gradient (FSDP1 flat
            parameters, a manual or ZeRO-style partition): local Grams are summed over this group. Leave
            None under DDP (gradients are replicated: summing would multiply every dot by the world size)
            and under FSDP2/HSDP (DTensor placements already say how to reduce).

    Scaling: the projection is invariant to positive scalings of the gradient and of each reference
    (``c_j r_j`` scales with ``g`` only), so with a ``GradScaler`` both the safety and the capability
    backward may be scaled (even by different factors): project before ``scaler.unscale_``. A non-finite
    Gram (an overflowed scaled backward) leaves the gradients untouched and sets ``stats.skipped``.

    Distributed: a collective call: every rank must call it, with the same parameters. Every rank gets the
    same coefficients, skip decision and statistics.

    Returns:
        :class:`~atax_kernels.ProjectionStats` (the gradients are modified in place).
    """
    params_obj = params
    if isinstance(params, torch.nn.Module):
        param_list = list(params.parameters())
    elif isinstance(params, torch.Tensor):
        param_list = [params]
    else:
        param_list = list(params)
    for i, p in enumerate(param_list):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a parameter (torch.Tensor)")
    _refuse_unsupported(params_obj, param_list, accelerator, process_group)
    reduce = None if process_group is None else gram_all_reducer(process_group)

    if callable(reference) and not isinstance(reference, (Subspace, torch.Tensor, list, tuple)):
        stash = GradStash(param_list)
        try:
            with torch.enable_grad():
                loss = reference()
                if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                    raise TypeError("the reference callable must return a loss tensor attached to autograd")
                if accelerator is not None:
                    accelerator.backward(loss)
                else:
                    loss.backward()
            # bucket views are read before restore() refills them: no copy needed
            caps = stash.capability(copy_views=False)
            # a parameter without a safety gradient stays out, as the safety step would leave it
            pairs = [(s, c) for s, c in zip(stash.safety(), caps) if s is not None]
            grads = [s for s, _ in pairs]
            refs = [c if c is not None else torch.zeros_like(s) for s, c in pairs]
            return project_impl(grads, refs, mode, strength, granularity, backend, reduce_grams=reduce)
        finally:
            stash.restore()

    keep = [i for i, p in enumerate(param_list) if p.grad is not None]
    grads = [param_list[i].grad for i in keep]
    refs = _select_reference(reference, keep, len(param_list))
    if not isinstance(refs, Subspace):  # None entries (no capability gradient there) count as zero
        nested = len(refs) > 0 and isinstance(refs[0], list)
        lists = refs if nested else [refs]
        lists = [[torch.zeros_like(g) if r is None else r for g, r in zip(grads, lst)] for lst in lists]
        refs = lists if nested else lists[0]
    return project_impl(grads, refs, mode, strength, granularity, backend, reduce_grams=reduce)
