"""``attach(trainer, reference=...)``: validate the arguments, normalise the reference, refuse what cannot work,
and install an :class:`~.handle.AtaxHandle` on the trainer."""
from __future__ import annotations

import warnings
from typing import Any

import torch

from ... import _validate as validate
from ...activation import ActivationSubspace
from ...activation.schedule import RefreshSchedule, check_refresh_every, check_schedule_for
from ...projection import GRANULARITIES, MODES
from ...references.subspace import Subspace
from .checks import (check_activation_reference, check_capability_batches, check_supported,
                     refuse_gradient_settings)
from .deepspeed_step import is_deepspeed
from .deepspeed_step import refuse as refuse_deepspeed
from .ema import EMA
from .handle import AtaxHandle
from .sources import as_source

__all__ = ["attach"]


def attach(
    trainer: Any,
    *,
    reference: Any,
    mode: str = "orthogonal",
    strength: float = 1.0,
    granularity: str = "global",
    refresh_every: int | RefreshSchedule = 1,
    reference_dtype: torch.dtype | None = None,
    backend: str | None = None,
    log_tax_rate: bool = False,
) -> AtaxHandle:
    """Project the trainer's (safety) gradients against a capability reference before every optimizer step.

    Args:
        trainer: any ``transformers.Trainer`` (every TRL trainer). Wrapped on the instance.
        reference: the capability reference. One of

            * an iterable of batches (``DataLoader``, list of dicts): the loss is ``model(**batch).loss``;
            * a callable ``(model) -> loss``, called with the trainer's (DDP/FSDP-wrapped) model (unlike
              ``ProjectedOptimizer(reference_fn=...)``, which is called with no arguments);
            * :class:`CapabilitySource` ``(batches, loss_fn=lambda model, batch: ...)``;
            * :class:`EMA` ``(source, beta=0.9)``: a persistent moving average of such gradients;
            * an :class:`~atax_kernels.Subspace` over the optimizer's parameters (in ``param_groups`` order):
              fixed directions, no extra backward;
            * an :class:`~atax_kernels.ActivationSubspace` (e.g. ``ActivationSubspace.from_loader(model,
              capability_loader, energy=0.99)``): no gradient is projected; instead the realised update of every
              protected parameter is projected after each optimizer step (step hooks on the torch optimizer,
              weight decay included), and every ``refresh_every`` steps the loader is observed again (one
              no-grad forward pass over it) and the bases updated. With ``contrast`` > 0 the training batch's
              own forward is observed as the safety side. Logs ``atax/feature_rank_mean`` and
              ``atax/update_removed_fraction``; the bases are saved in checkpoints.
        mode, strength, granularity, backend: as in :func:`atax_kernels.project_`. With an
            ``ActivationSubspace`` only ``backend`` applies: other values of mode/strength/granularity (and
            ``log_tax_rate=True``) are refused (``energy`` is its dial).
        refresh_every: recompute the capability gradient every this many optimizer steps (reusing the
            previous live reference, or the EMA, in between). Each refresh costs one forward + backward.
            With an ``ActivationSubspace`` reference: re-observe its loader and rebuild the bases every this many
            steps, or pass a :class:`~atax_kernels.activation.RefreshSchedule` (e.g. ``RefreshSchedule(every=10,
            tol=0.02)``; needs a subspace built by ``from_loader``): each check re-observes the loader and
            rebuilds only if the bases no longer hold ``energy - tol`` of it, and the interval doubles while
            they are kept (measured on SmolLM2-135M: 0 rebuilds in 30 SFT steps, refresh cost 0.90 -> 0.25 s per
            step, bench/results/activation-refresh-smollm2.md). Its position is saved in checkpoints. Step 0
            refreshes only when there are no bases yet (or with ``contrast`` > 0), for an int and a schedule.
        reference_dtype: EMA buffer dtype (``torch.bfloat16`` halves its memory); default the gradient's.
        log_tax_rate: also log ``atax/tax_rate``: the :func:`atax_kernels.tax.tax_rate` of this step's safety
            gradient against the reference span (one sample each, so it is the fraction of ``|g|^2`` inside
            the span: ``cos^2`` for one reference; for several, ``(removed_fraction / strength)^2`` in
            orthogonal mode). Free: computed from the projection's statistics, no extra pass.

    Returns:
        An :class:`AtaxHandle` (``handle.detach()`` undoes everything; ``handle.last_stats``).

    Raises:
        NotImplementedError: optimizer-in-backward (LOMO/AdaLomo, layer-wise GaLore, post-accumulate
            grad hooks), reentrant gradient checkpointing; under DeepSpeed ZeRO (served for live capability
            references with ``refresh_every=1`` and ActivationSubspace references: the projection runs inside the
            engine, see docs/deepspeed.md) EMA and Subspace references, ``refresh_every`` > 1 for capability
            references, an ActivationSubspace with LoRA or Conv1D layers, stage 0 and offload; the message
            says what to use instead.
        TypeError, ValueError: bad arguments (among them a model, a tensor or a zero-argument callable as
            ``reference``), or a trainer that already has atax attached; capability batches (for gradient
            references with the default loss) whose first batch lacks the model's inputs or labels, or is not a
            dict (a list or a DataLoader is looked at here, nothing consumed; another iterable when its first
            batch is drawn).
    """
    check_supported(trainer)
    for name in ("training_step", "log", "add_callback", "remove_callback", "accelerator", "args"):
        if not hasattr(trainer, name):
            raise TypeError(f"trainer must be a transformers.Trainer (missing .{name}), got {type(trainer).__name__}")
    if getattr(trainer, "_atax_handle", None) is not None:
        raise ValueError("atax is already attached to this trainer; call handle.detach() first")
    validate.check_choice(mode, "mode", MODES)
    validate.check_choice(granularity, "granularity", GRANULARITIES)
    strength = validate.check_strength(strength)
    check_refresh_every(refresh_every, "attach")
    if reference_dtype is not None and reference_dtype not in validate.SUPPORTED_DTYPES:
        raise TypeError(f"reference_dtype must be a floating dtype, got {reference_dtype}")
    if backend is not None:
        validate.check_choice(backend, "backend", ("torch", "cpu", "cuda", "triton"))
    if reference is None:
        raise ValueError("reference is required: capability batches, a callable (model) -> loss, EMA(...), "
                         "or a Subspace")
    if isinstance(refresh_every, RefreshSchedule) and not isinstance(reference, ActivationSubspace):
        raise ValueError(f"attach(refresh_every={refresh_every!r}): a RefreshSchedule decides when an "
                         f"ActivationSubspace reference is refreshed; a {type(reference).__name__} reference takes "
                         f"an int refresh_every")
    if isinstance(reference, ActivationSubspace):
        check_activation_reference(trainer, reference)
        if isinstance(refresh_every, RefreshSchedule):
            check_schedule_for(reference, refresh_every, "attach", can_observe=reference.loader is not None)
        if reference_dtype is not None:
            warnings.warn("reference_dtype is ignored for an ActivationSubspace reference", stacklevel=2)
        ref: Any = reference
    elif isinstance(reference, Subspace):
        if reference_dtype is not None:
            warnings.warn("reference_dtype is ignored for a Subspace reference (its dtype is fixed at creation)",
                          stacklevel=2)
        ref: Any = reference
    elif isinstance(reference, EMA):
        ref = reference
    else:
        ref = as_source(reference)
        if reference_dtype is not None:
            warnings.warn("reference_dtype only applies to EMA references", stacklevel=2)
    refuse_gradient_settings(ref, mode=mode, strength=strength, granularity=granularity, log_tax_rate=log_tax_rate)
    if is_deepspeed(trainer):
        refuse_deepspeed(trainer, ref, refresh_every)
    check_capability_batches(trainer, ref)
    handle = AtaxHandle(trainer, ref, mode, strength, granularity, refresh_every, reference_dtype, backend)
    handle.log_tax_rate = bool(log_tax_rate)
    handle._install()
    return handle
