"""Activation-space projection (``ActivationSubspace``): protect what the capability data's activations span (the multi-subspace mode).

For a weight W (d_out x d_in) whose inputs on capability data lie (mostly) in span(U), U = the top
eigenvectors of the input second moment ``C = sum x x^T`` holding a fraction ``energy`` of its trace,
projecting the optimizer's realised update ``dW <- dW - (dW U) U^T`` makes ``dW x = 0`` on that span. If every
layer does it, the model's outputs on those inputs do not move (exactly, not to first order); training
happens in what the capability inputs do not use. See docs/DESIGN.md, "Activation-space projection".

Typical use::

    sub = ActivationSubspace(model, energy=0.99)
    with torch.no_grad(), sub.observe(attention_mask=mask):
        model(input_ids=cap_ids, attention_mask=mask)      # streams sum x x^T per distinct input
    sub.update()                                           # bases from what was observed
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters()), activation_subspace=sub)

What is protected (``modules=None``: every such module with a trainable weight):

* ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2; its weight is [d_in, d_out], projected as its transpose);
* PEFT LoRA ``Linear`` layers: the update of ``lora_A`` (r_lora x d_in) is projected with the layer input's
  basis, and the update of ``lora_B`` with the basis of ``A x`` (eigenvectors of ``A C A^T``, computed from
  the same second moment at ``update()``, so no extra accumulator). Both are needed: with only A projected,
  ``dB A x`` still moves ``B A x``. ``lora_dropout`` does not matter (the layer's clean input is observed).
  DoRA and LoRA embeddings/convolutions are refused;
* ``nn.Embedding``: inputs are one-hot, so the protected set is the rows of the tokens the capability data
  uses (all of them: a used token's row *is* its input, nothing partial to leave out); with ``contrast`` the
  tokens whose capability frequency exceeds ``contrast`` x their safety frequency; ``energy=0`` protects none,
  ``max_rank`` keeps the most frequent. Their update is zeroed.
* Biases of protected modules and normalisation weights: their updates are zeroed by default
  (``biases="freeze"``, ``norms="freeze"``; ``"free"`` leaves them to the optimizer). A bias or a norm gain
  moves the output for *every* input, so left free it spends exactly what the projection protects. Measured
  (``finetune_safety(method="activation")``, energy 0.99, 300 AdamW steps, held-out scores, lr 3e-4 / 1e-3):
  biases on a bias-enabled tiny Llama, modular task, seeds 0 and 1: capability 0.94 / 0.74 and 0.96 / 0.86
  free against 1.00 / 1.00 and 1.00 / 0.99 frozen, safety 1.00 in all eight runs. RMSNorm weights: modular
  task 1.00 / 1.00 either way (it saturates); overflow task (semantic trigger), seeds 0 and 1: capability
  0.58 / 0.16 and 0.38 / 0.03 free against 0.72 / 0.41 and 0.73 / 0.30 frozen, safety 0.86 / 1.00 and
  0.68 / 1.00 free against 0.80 / 0.96 and 0.51 / 0.92 frozen. So freezing norms is a trade there (more
  capability kept, slower safety), and it is the setting under which the guarantee below holds exactly.

Shared inputs: modules whose forward pre-hook receives the same live input tensor in one forward (q/k/v read
the same normed hidden state, gate/up too) are found at run time and share one accumulator and one basis.

Memory: persistent state is only the bases, ``sum d_in * r * itemsize(basis_dtype)`` bytes (plus 8 bytes per
protected token and, with ``update(decay>0)``, one d_in x d_in float64 moment per distinct input). While
observing, each distinct input holds a d_in x d_in float64 accumulator and a same-size staging buffer (the
batch is folded in only if it was finite); ``update()`` with ``decay=0`` frees them.

Eigen-solutions: full ``torch.linalg.eigh`` for d_in <= ``EIGH_MAX_DIM`` (float64 up to 1024, float32 above:
twice as fast, and the bases are stored in float32); above it (and with
contrast 0) a block subspace iteration warm-started from the previous basis with Rayleigh-Ritz, growing the
block until it holds ``energy`` of the (exact) trace. Contrast > 0 always uses the full eigh.

Distributed: ``update()`` sums the second moments and token counts over the data-parallel group (one
all-reduce of one flat float64 buffer), so every replica computes the same basis.

Layout (imports go down this list): ``apply`` (what optimizers and trainers call: snapshot, inner step,
projected update; empty stats; refresh from a forward), ``subspace`` (``ActivationSubspace``: construction and
checks, made of the mixins below), ``loaders`` (observe a loader, ``refresh``), ``state`` (state_dict),
``report`` (ranks, coverage, memory), ``project`` (``project_updates_``), ``bases`` (``update()``,
``update_if_drifted()``), ``moments`` (hooks, masked accumulation, all-reduce), ``discovery`` (module kinds,
shared inputs), ``inputs`` (the per-module and per-input records), ``schedule`` (``RefreshSchedule``: when to
refresh), ``eigen`` (rank selection, eigh, subspace iteration), ``settings``, ``stats``.
"""
from __future__ import annotations

from .apply import UpdateSnapshot, empty_stats, refresh
from .schedule import RefreshSchedule
from .stats import ActivationStats
from .subspace import ActivationSubspace

__all__ = ["ActivationSubspace", "ActivationStats", "RefreshSchedule", "UpdateSnapshot", "empty_stats", "refresh"]
