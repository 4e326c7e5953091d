"""What ``attach`` refuses before touching the trainer, each with what to use instead: unsupported trainers
(optimizer-in-backward, reentrant checkpointing; DeepSpeed's own refusals are in deepspeed_step.py), gradient settings given with an
ActivationSubspace, capability batches the model cannot take, an ActivationSubspace that would protect nothing."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..._batches import check_first
from ...activation import ActivationSubspace
from .ema import EMA, source_of

__all__ = ["check_supported", "check_no_post_accumulate_hooks", "refuse_gradient_settings",
           "check_capability_batches", "check_activation_reference"]


def _transformers_reentrant_default() -> bool:
    """Whether the installed transformers checkpoints reentrantly when ``use_reentrant`` is not given."""
    try:
        import transformers
        return int(transformers.__version__.split(".")[0]) < 5   # v5 defaults to use_reentrant=False
    except Exception:  # pragma: no cover
        return True


_OPTIMIZER_IN_BACKWARD = (
    "this trainer applies optimizer updates inside backward ({what}), so no accumulated gradient exists "
    "at the end of training_step to project. Use a regular optimizer (e.g. optim='adamw_torch'; "
    "non-layer-wise 'galore_adamw' works), or project in your own loop with atax_kernels.ProjectedOptimizer.")


def check_no_post_accumulate_hooks(params: Iterable[torch.Tensor], found: str) -> None:
    """Refuse parameters with post-accumulate-grad hooks (an optimizer step inside backward); ``found`` starts
    the message (where they were found)."""
    if any(bool(getattr(p, "_post_accumulate_grad_hooks", None)) for p in params):
        raise NotImplementedError(found + _OPTIMIZER_IN_BACKWARD.format(what="register_post_accumulate_grad_hook"))


def check_supported(trainer: Any) -> None:
    """Refuse optimizer-in-backward setups (LOMO/AdaLomo, layer-wise GaLore, post-accumulate-grad
    hooks) and reentrant gradient checkpointing."""
    args = getattr(trainer, "args", None)
    # DeepSpeed ZeRO-1/2/3 is served inside the engine (deepspeed_step.py); what it does not serve is refused
    # there (deepspeed_step.refuse) and by attach_engine (offload, pipeline, MoE, ...).
    optim = str(getattr(getattr(args, "optim", ""), "value", getattr(args, "optim", ""))).lower()
    if "lomo" in optim:
        raise NotImplementedError("atax attach() refuses optim=%r: " % optim
                                  + _OPTIMIZER_IN_BACKWARD.format(what="LOMO/AdaLomo"))
    if "galore" in optim and "layerwise" in optim:
        raise NotImplementedError("atax attach() refuses optim=%r: " % optim
                                  + _OPTIMIZER_IN_BACKWARD.format(what="layer-wise GaLore"))
    model = getattr(trainer, "model", None)
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    opt = getattr(trainer, "optimizer", None)
    if opt is not None and hasattr(opt, "param_groups"):
        params += [p for g in opt.param_groups for p in g["params"]]
    check_no_post_accumulate_hooks(params, "atax attach() found parameters with post-accumulate-grad hooks: ")
    gc = bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))
    if gc:
        kw = getattr(args, "activation_checkpointing_kwargs", None) or getattr(
            args, "gradient_checkpointing_kwargs", None) or {}
        if kw.get("use_reentrant", _transformers_reentrant_default()):
            raise NotImplementedError(
                "atax attach() refuses reentrant gradient checkpointing: the extra capability backward runs "
                "through checkpointed blocks whose reentrant recomputation does not compose with it (and DDP "
                "hooks fire twice). Pass gradient_checkpointing_kwargs={'use_reentrant': False} "
                "(activation_checkpointing_kwargs on transformers >= 5)."
            )


def refuse_gradient_settings(ref: Any, *, mode: str, strength: float, granularity: str, log_tax_rate: bool) -> None:
    """With an ActivationSubspace no gradient is projected: the gradient-projection settings would be ignored."""
    if not isinstance(ref, ActivationSubspace):
        return
    given = [f"{k}={v!r}" for k, v, default in (("mode", mode, "orthogonal"), ("strength", strength, 1.0),
                                                ("granularity", granularity, "global"),
                                                ("log_tax_rate", log_tax_rate, False)) if v != default]
    if given:
        raise ValueError(
            f"attach(reference=ActivationSubspace): {', '.join(given)} do not apply to activation projection (no "
            f"gradient is projected: each protected weight's realised update loses its part on the capability "
            f"input basis, entirely, so dW x = 0 on that span); leave them at their defaults. The dial is the "
            f"subspace's energy= (and max_rank=, contrast=); mode/strength/granularity are for gradient "
            f"references (capability batches, EMA, Subspace)")


def check_capability_batches(trainer: Any, ref: Any) -> None:
    """Gradient references from batches with the default loss: the first batch must hold the model's inputs
    and labels (model(**batch).loss). Peeked without consuming (a list, a DataLoader); any other iterable (a
    generator, ...) is checked when its first batch is drawn."""
    source = source_of(ref)
    if source is None or source.batches is None or source.loss_fn is not None:
        return
    where = f"the capability loader of attach(reference={'EMA(...)' if isinstance(ref, EMA) else '...'})"
    if not check_first(trainer.model, source.batches, where=where, needs_loss=True):
        source._first_check = (trainer.model, where)


def check_activation_reference(trainer: Any, sub: ActivationSubspace) -> None:
    """An ActivationSubspace that would protect nothing of what this trainer trains is an error, not a no-op."""
    model = getattr(trainer, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"trainer.model must be a torch.nn.Module, got {type(model).__name__}")
    sub.check_protects(list(model.parameters()), where="the trainer's model")
    if not sub.has_observed():
        raise ValueError(
            "the ActivationSubspace has observed no capability data (no observe() forward, no update()), so it "
            "would protect nothing and only freeze biases and norms: build it with "
            "ActivationSubspace.from_loader(trainer.model, capability_loader, ...) or observe() capability "
            "forwards before attach()")
