"""Attach gradient projection to any ``transformers.Trainer`` (so every TRL trainer: DPO, SFT, GRPO, ...).

Three lines::

    from atax_kernels.hf import attach
    trainer = DPOTrainer(...)                                  # any transformers.Trainer
    handle = attach(trainer, reference=capability_loader)      # batches whose model(**batch).loss is capability
    trainer.train()

How it works. ``attach`` wraps ``trainer.training_step`` *on the instance*. On the micro-batch where
``trainer.accelerator.sync_gradients`` is true (the last of a gradient-accumulation window) it

1. runs the original training step (the safety loss: DPO/SFT/GRPO/...; its return value is kept);
2. stashes the accumulated safety gradients without copying (``p.grad`` moves aside; gradients that are views
   of a shared buffer, as with DDP ``gradient_as_bucket_view``, are cloned) and sets ``p.grad = None``;
3. computes the capability loss through the ``model`` argument of ``training_step`` (the DDP/FSDP-wrapped
   module, under ``trainer.compute_loss_context_manager()``, so accelerate's autocast applies) and runs
   ``trainer.accelerator.backward(loss)``: scaled, synchronised and cast like the safety loss;
4. takes those gradients as the reference (live, or folded into an EMA) and restores the safety gradients;
5. ``project_``\\ s the safety gradients against the reference(s), in place.

The trainer then clips (so the logged ``grad_norm`` is the projected one) and steps. Parameters are read from
``trainer.optimizer.param_groups`` at every step, never cached. ``unscale_`` is never called here.

Logged (on every logging step, added to the trainer's own log dict): ``atax/cosine`` (cosine between the safety
gradient and the reference before projection), ``atax/removed_fraction``, ``atax/skipped``, ``atax/ref_norm``.
With several references (a :class:`~atax_kernels.Subspace`), cosine and ref_norm are logged per reference as
``atax/cosine/<j>`` and ``atax/ref_norm/<j>`` (scalars, which every logging integration accepts). Each value is
the mean over the optimizer steps since the previous log (the ``logging_steps`` window, as the Trainer averages
``loss``); ``atax/skipped`` is the fraction of those steps that were skipped, and the other values average the
steps that were not.

Checkpoints. A ``TrainerCallback.on_save`` writes ``atax_reference.pt`` (``atax_reference_rank<r>.pt`` with
several processes) into each ``checkpoint-<step>`` folder: the EMA buffers, the Subspace basis and the step
counter. Resuming is hooked by wrapping ``trainer._load_optimizer_and_scheduler`` on the instance: the Trainer
calls it with the resolved checkpoint folder on every resume path (``resume_from_checkpoint=True`` included, FSDP
included), after the optimizer exists. The state read there is applied at the first projected step (when the
parameters are known on their final devices). The capability stream is saved too: the position inside the
current pass over the reference batches and the RNG states that pass began with (torch, Python, NumPy and the
loader's own generators), so a resumed run draws the same capability batches, shuffled DataLoaders included
(random per-batch transforms that draw from the global RNG are not replayed); so is a live reference that is
reused until the next refresh (``refresh_every > 1``).

DeepSpeed ZeRO-1/2/3 (accelerate's DeepSpeed plugin): the projection runs inside the engine (deepspeed_step.py,
``attach_engine`` at ``on_train_begin``), for live capability references; EMA, Subspace, ActivationSubspace,
``refresh_every`` > 1, stage 0 and offload are refused there with what is missing (docs/deepspeed.md).

Refused (with what to use instead): optimizer-in-backward setups (LOMO/AdaLomo, layer-wise GaLore,
any parameter with a post-accumulate-grad hook), reentrant gradient checkpointing.
"""
from __future__ import annotations

from .attach import attach
from .checkpoint import REFERENCE_FILE
from .ema import EMA
from .handle import AtaxHandle
from .sources import CapabilitySource

__all__ = ["attach", "AtaxHandle", "EMA", "CapabilitySource", "REFERENCE_FILE"]
