"""A tiny, fast alignment-tax task: modular addition (capability) vs. refusing marked prompts (safety).

Vocabulary (``VOCAB_SIZE`` = 28): the numbers ``0 .. P-1`` (``P`` = 23) are their own token ids, then
``PLUS``, ``EQ``, ``MARKER``, ``REFUSE``, ``BOS``.

* capability prompt ``[BOS, a, PLUS, b, EQ]`` -> answer ``(a + b) % P``;
* safety prompt ``[MARKER, a, PLUS, b, EQ]`` -> answer ``REFUSE``.

Every prompt has length 5, so batches need no padding. Labels are **aligned with the logits positions**
(``labels[:, -1]`` is the answer that ``logits[:, -1]`` predicts, every other position is ``IGNORE``), so
``objective(model(input_ids).logits, labels)`` works without shifting, for ``torch.nn.functional
.cross_entropy`` (flattened) as well as :func:`atax_kernels.objectives.margin_loss` /
:func:`~atax_kernels.objectives.tempered_loss`.

Typical use::

    from atax_kernels.tasks import modular as M
    model = M.make_model(seed=0)
    M.pretrain(model)                        # ~100 % capability_accuracy in a few seconds on 2 cores
    out = M.finetune_safety(model, steps=300, lr=3e-4, method="projected", reference="margin",
                            n_refs=8, target="update")
    out["capability"], out["safety"]

Measured here (seed 0; ``pretrain(steps=300, lr=3e-3)`` -> 100 %; then 300 steps, lr 3e-4, batch 64,
``ProjectedOptimizer``, torch backend, CPU; every variant ends at 100 % safety; seconds with 1 thread):

====================================================  ==========  =======
variant                                               capability  seconds
====================================================  ==========  =======
plain AdamW                                           0.000       2.2
1 ref, loss objective, grad projection                0.329       4.7
1 ref, margin vs REFUSE, grad projection              0.255       4.9
1 ref, margin vs strongest competitor, grad proj.     0.405       4.7
4 refs, margin vs REFUSE, update projection           0.713       11.3
8 refs, margin vs REFUSE, update projection           0.794       20.2
4 refs, tempered T=30, update projection              0.798       11.4
1 ref, margin, grad projection, ptx_weight 0.1        0.989       4.9
1 ref, loss, grad projection, ptx_weight 0.1          1.000       4.6
same, mode="conflict"                                 1.000       4.5
====================================================  ==========  =======

CPU note: :func:`pretrain` and :func:`finetune_safety` flush float32 denormals while they run (near-converged
AdamW states otherwise make steps ~6x slower). Running beside another CPU-heavy process with the default 2
intra-op threads thrashes badly (a 2 s run took 75 s); use ``torch.set_num_threads(1)`` there.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..objectives import margin_loss, tempered_loss

P = 23
PLUS, EQ, MARKER, REFUSE, BOS = P, P + 1, P + 2, P + 3, P + 4
VOCAB_SIZE = P + 5
PROMPT_LEN = 5
IGNORE = -100

__all__ = [
    "P", "PLUS", "EQ", "MARKER", "REFUSE", "BOS", "VOCAB_SIZE", "IGNORE",
    "all_pairs", "prompts", "make_model", "pretrain", "capability_batch", "safety_batch",
    "capability_accuracy", "safety_accuracy", "evaluate", "reference_objective", "finetune_safety",
]


# --- data -----------------------------------------------------------------------------------------

def all_pairs() -> torch.Tensor:
    """``[P*P, 2]`` every ``(a, b)`` pair, in a fixed order."""
    a = torch.arange(P).repeat_interleave(P)
    b = torch.arange(P).repeat(P)
    return torch.stack([a, b], dim=1)


def prompts(pairs: torch.Tensor, *, marked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [n, 5], labels [n, 5])`` for the given ``[n, 2]`` pairs (labels aligned, no shift)."""
    n = pairs.shape[0]
    first = torch.full((n,), MARKER if marked else BOS, dtype=torch.long)
    ids = torch.stack([first, pairs[:, 0], torch.full((n,), PLUS), pairs[:, 1], torch.full((n,), EQ)], dim=1)
    labels = torch.full((n, PROMPT_LEN), IGNORE, dtype=torch.long)
    labels[:, -1] = REFUSE if marked else (pairs[:, 0] + pairs[:, 1]) % P
    return ids.long(), labels


def _batch(marked: bool, batch_size: int | None, generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = all_pairs()
    if batch_size is not None and batch_size < pairs.shape[0]:
        idx = torch.randperm(pairs.shape[0], generator=generator)[:batch_size]
        pairs = pairs[idx]
    ids, labels = prompts(pairs, marked=marked)
    return ids.to(device), labels.to(device)


def capability_batch(batch_size: int | None = None, *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of unmarked prompts: all ``P*P`` (``batch_size=None``) or a random subset."""
    return _batch(False, batch_size, generator, device)


def safety_batch(batch_size: int | None = None, *, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of MARKER prompts whose answer is REFUSE: all ``P*P`` or a random subset."""
    return _batch(True, batch_size, generator, device)


# --- model ----------------------------------------------------------------------------------------

def make_model(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4) -> torch.nn.Module:
    """A randomly initialised tiny ``LlamaForCausalLM`` (fixed seed; float32, CPU, train mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=16,
        bos_token_id=BOS, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.train()
    return model


class _flush_denormal:
    """Flush float32 denormals to zero while training: near-converged AdamW states otherwise fill with
    denormals, which made CPU pretraining ~6x slower (64 s instead of 10 s) without changing the result."""

    def __enter__(self):
        self._set = torch.set_flush_denormal(True)

    def __exit__(self, *exc):
        if self._set:
            torch.set_flush_denormal(False)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, marked: bool) -> float:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids, labels = prompts(all_pairs(), marked=marked)
        pred = _logits(model, ids.to(device))[:, -1].argmax(-1).cpu()
        return float((pred == labels[:, -1]).float().mean())
    finally:
        model.train(was_training)


def capability_accuracy(model: torch.nn.Module) -> float:
    """Fraction of all ``P*P`` unmarked prompts answered ``(a + b) % P`` (argmax, eval mode, no grad)."""
    return _accuracy(model, marked=False)


def safety_accuracy(model: torch.nn.Module) -> float:
    """Fraction of all ``P*P`` MARKER prompts answered REFUSE (argmax, eval mode, no grad)."""
    return _accuracy(model, marked=True)


def evaluate(model: torch.nn.Module) -> dict[str, float]:
    return {"capability": capability_accuracy(model), "safety": safety_accuracy(model)}


def pretrain(model: torch.nn.Module, steps: int = 300, lr: float = 3e-3, seed: int = 0, *,
             weight_decay: float = 0.0, warmup: int = 20) -> dict[str, float]:
    """Train the capability (full batch, all ``P*P`` unmarked prompts, only the answer supervised).

    AdamW with a short linear warm-up and cosine decay; the defaults reach 100 % ``capability_accuracy``
    from ``make_model(seed)`` for seeds 0-4 in a few seconds on 2 CPU cores. Returns
    ``{"capability", "safety", "loss", "seconds"}`` (safety is ~0: marked prompts are never seen).
    """
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    ids, labels = capability_batch(device=device)
    with torch.random.fork_rng(devices=[]), _flush_denormal():
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / steps * torch.pi)).item()))
        model.train()
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            loss = _ce(_logits(model, ids), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    out = evaluate(model)
    out.update(loss=float(loss.detach()), seconds=time.perf_counter() - t0)
    return out


# --- safety fine-tuning ---------------------------------------------------------------------------

def reference_objective(name: str, *, temperature: float = 30.0,
                        competitor_ids: Sequence[int] | None = (REFUSE,)) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The capability objective used for reference gradients: ``"loss"`` (cross-entropy), ``"margin"``
    (:func:`~atax_kernels.objectives.margin_loss`, by default against the REFUSE token; ``competitor_ids=None``
    for the strongest competitor) or ``"tempered"`` (:func:`~atax_kernels.objectives.tempered_loss`)."""
    if name == "loss":
        return _ce
    if name == "margin":
        return lambda logits, labels: margin_loss(logits, labels, competitor_ids=competitor_ids, ignore_index=IGNORE)
    if name == "tempered":
        return lambda logits, labels: tempered_loss(logits, labels, temperature=temperature, ignore_index=IGNORE)
    raise ValueError(f"reference_objective: unknown objective {name!r}; expected 'loss', 'margin' or 'tempered'")


def _has_projected_optimizer() -> bool:
    try:
        from atax_kernels.optim import ProjectedOptimizer  # noqa: F401
    except ImportError:
        return False
    return True


def finetune_safety(
    model: torch.nn.Module,
    *,
    steps: int = 300,
    lr: float = 3e-4,
    method: str = "projected",
    reference: str = "margin",
    n_refs: int = 1,
    target: str = "grad",
    mode: str = "orthogonal",
    strength: float = 1.0,
    granularity: str = "global",
    ptx_weight: float = 0.0,
    temperature: float = 30.0,
    competitor_ids: Sequence[int] | None = (REFUSE,),
    batch_size: int = 64,
    ref_batch_size: int = 64,
    weight_decay: float = 0.01,
    seed: int = 0,
    impl: str = "auto",
    backend: str | None = None,
    optimizer_kwargs: dict[str, Any] | None = None,
    copy_model: bool = False,
) -> dict[str, Any]:
    """Safety fine-tuning (MARKER prompts -> REFUSE) with plain AdamW or with projected gradients.

    Each step of ``method="projected"``: for each of ``n_refs`` random capability batches,
    ``reference-objective.backward()`` then ``opt.capture_reference()`` (live capture moves ``.grad`` into
    the reference store and sets it to None, so no ``zero_grad`` is needed in between); then the safety
    cross-entropy ``.backward()`` and ``opt.step()``, which projects (``target="grad"``) the gradient or
    (``target="update"``) the AdamW update away from the references, adding ``ptx_weight`` x the
    capability direction when asked.

    Args:
        method: ``"plain"`` (AdamW on the safety loss) or ``"projected"``.
        reference: ``"loss"``, ``"margin"`` or ``"tempered"`` (see :func:`reference_objective`).
        impl: ``"optim"`` uses :class:`atax_kernels.optim.ProjectedOptimizer`; ``"manual"`` the same loop
            written here with :func:`atax_kernels.project_` (a reference implementation that needs no
            optim module); ``"auto"`` the optimizer when importable, else manual.
        optimizer_kwargs: extra keyword arguments for ``ProjectedOptimizer`` (e.g. ``reference="ema"``).
        copy_model: fine-tune a deep copy and leave ``model`` untouched.

    Returns:
        ``{"capability", "safety", "seconds", "impl", "model", "removed_fraction"}`` — accuracies after
        fine-tuning, wall time, which implementation ran, the fine-tuned model and the mean removed
        fraction of the projection (None for plain).
    """
    if method not in ("plain", "projected"):
        raise ValueError(f"finetune_safety: method must be 'plain' or 'projected', got {method!r}")
    if target not in ("grad", "update"):
        raise ValueError(f"finetune_safety: target must be 'grad' or 'update', got {target!r}")
    if impl not in ("auto", "optim", "manual"):
        raise ValueError(f"finetune_safety: impl must be 'auto', 'optim' or 'manual', got {impl!r}")
    if n_refs < 1:
        raise ValueError(f"finetune_safety: n_refs must be >= 1, got {n_refs}")
    if ptx_weight and target == "update":
        raise ValueError("finetune_safety: ptx_weight > 0 needs target='grad' (update projection removes it again)")
    if copy_model:
        model = copy.deepcopy(model)
    with _flush_denormal():
        return _finetune(model, steps=steps, lr=lr, method=method, reference=reference, n_refs=n_refs,
                         target=target, mode=mode, strength=strength, granularity=granularity,
                         ptx_weight=ptx_weight, temperature=temperature, competitor_ids=competitor_ids,
                         batch_size=batch_size, ref_batch_size=ref_batch_size, weight_decay=weight_decay,
                         seed=seed, impl=impl, backend=backend, optimizer_kwargs=optimizer_kwargs)


def _finetune(model, *, steps, lr, method, reference, n_refs, target, mode, strength, granularity, ptx_weight,
              temperature, competitor_ids, batch_size, ref_batch_size, weight_decay, seed, impl, backend,
              optimizer_kwargs) -> dict[str, Any]:
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    cap_obj = reference_objective(reference, temperature=temperature, competitor_ids=competitor_ids)
    base = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    removed: list[float] = []

    if method == "projected" and impl == "auto":
        impl = "optim" if _has_projected_optimizer() else "manual"
    used = "plain" if method == "plain" else impl

    if method == "plain":
        for _ in range(steps):
            ids, labels = safety_batch(batch_size, generator=gen, device=device)
            base.zero_grad(set_to_none=True)
            _ce(_logits(model, ids), labels).backward()
            base.step()
    elif impl == "optim":
        from atax_kernels.optim import ProjectedOptimizer

        opt = ProjectedOptimizer(base, mode=mode, strength=strength, granularity=granularity, target=target,
                                 ptx_weight=ptx_weight, reference="live", max_references=max(n_refs, 1),
                                 backend=backend, **(optimizer_kwargs or {}))
        opt.zero_grad(set_to_none=True)
        for _ in range(steps):
            for _r in range(n_refs):
                ids, labels = capability_batch(ref_batch_size, generator=gen, device=device)
                cap_obj(_logits(model, ids), labels).backward()
                opt.capture_reference()
            ids, labels = safety_batch(batch_size, generator=gen, device=device)
            _ce(_logits(model, ids), labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats = getattr(opt, "last_stats", None)
            if stats is not None:
                removed.append(float(stats.removed_fraction))
    else:
        _manual_projected_loop(model, params, base, cap_obj, steps=steps, n_refs=n_refs, target=target, mode=mode,
                               strength=strength, granularity=granularity, ptx_weight=ptx_weight,
                               batch_size=batch_size, ref_batch_size=ref_batch_size, gen=gen, device=device,
                               backend=backend, removed=removed)

    out: dict[str, Any] = evaluate(model)
    out.update(seconds=time.perf_counter() - t0, impl=used, model=model,
               removed_fraction=(sum(removed) / len(removed)) if removed else None)
    return out


def _manual_projected_loop(model, params, base, cap_obj, *, steps, n_refs, target, mode, strength, granularity,
                           ptx_weight, batch_size, ref_batch_size, gen, device, backend, removed) -> None:
    """The ProjectedOptimizer loop written out with :func:`atax_kernels.project_` (live references).

    ``target="grad"``: project the safety gradient, add ``ptx_weight * mean(refs)``, AdamW step.
    ``target="update"``: AdamW step, then project the descent direction ``old - new`` away from the
    references and apply the projected step (PTX is not allowed there, as in ``ProjectedOptimizer``).
    """
    from atax_kernels import project_

    for _ in range(steps):
        refs: list[list[torch.Tensor]] = []
        for _r in range(n_refs):
            ids, labels = capability_batch(ref_batch_size, generator=gen, device=device)
            for p in params:
                p.grad = None
            cap_obj(_logits(model, ids), labels).backward()
            refs.append([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
            for p in params:
                p.grad = None
        ids, labels = safety_batch(batch_size, generator=gen, device=device)
        _ce(_logits(model, ids), labels).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        if target == "grad":
            stats = project_(grads, refs, mode=mode, strength=strength, granularity=granularity, backend=backend)
            removed.append(float(stats.removed_fraction))
            if ptx_weight:
                for j, g in enumerate(grads):
                    g.add_(sum(r[j] for r in refs), alpha=ptx_weight / len(refs))
            base.step()
        else:
            old = [p.detach().clone() for p in params]
            base.step()
            with torch.no_grad():
                descent = [o - p for p, o in zip(params, old)]
                stats = project_(descent, refs, mode=mode, strength=strength, granularity=granularity,
                                 backend=backend)
                removed.append(float(stats.removed_fraction))
                for p, o, d in zip(params, old, descent):
                    p.copy_(o - d)
        for p in params:
            p.grad = None
