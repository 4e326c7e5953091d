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

Refused (with what to use instead): DeepSpeed, optimizer-in-backward setups (LOMO/AdaLomo, layer-wise GaLore,
any parameter with a post-accumulate-grad hook), reentrant gradient checkpointing.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch

from .. import _validate as V
from ..projection import GRANULARITIES, MODES, ProjectionStats, project_
from ..subspace import Subspace
from ..activation import ActivationSubspace

__all__ = ["attach", "AtaxHandle", "EMA", "CapabilitySource", "REFERENCE_FILE"]

REFERENCE_FILE = "atax_reference.pt"


# ---------------------------------------------------------------------------------------------------------------
# Reference sources
# ---------------------------------------------------------------------------------------------------------------
def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"reference batches must be dicts of model inputs (model(**batch).loss), got {type(batch).__name__}; "
            f"pass CapabilitySource(batches, loss_fn=lambda model, batch: ...) for other batch types"
        )
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError(
            "model(**batch) returned no loss for a reference batch: include 'labels' in the capability batches, "
            "or pass CapabilitySource(batches, loss_fn=lambda model, batch: ...)"
        )
    return loss


def _loader_generators(batches: Any) -> list[torch.Generator]:
    """torch.Generators a DataLoader (or its sampler) draws its order from (one implementation, in _batches)."""
    from .._batches import _generators

    return _generators(batches)


def _rng_snapshot(batches: Any) -> dict[str, Any]:
    """The CPU RNG states an iterable's order can depend on, in types ``torch.load(weights_only=True)`` reads."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "generators": [g.get_state() for g in _loader_generators(batches)]}


def _rng_restore(batches: Any, state: Mapping[str, Any], *, generators: bool) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if generators:
        gens = _loader_generators(batches)
        if len(gens) == len(state["generators"]):
            for g, st in zip(gens, state["generators"]):
                g.set_state(st)


class CapabilitySource:
    """Where the capability loss comes from.

    Args:
        batches: an iterable of batches (a ``DataLoader``, a list of dicts, ...), cycled: re-iterated when
            exhausted. ``None`` when ``loss_fn`` needs no batch.
        loss_fn: ``loss_fn(model, batch) -> loss`` (with ``batches``) or ``loss_fn(model) -> loss`` (without).
            Default: ``model(**batch).loss``. ``model`` is the module the trainer passes to ``training_step``
            (DDP/FSDP-wrapped); tensors of ``batch`` are moved to the trainer's device first.
    """

    def __init__(self, batches: Iterable | None = None, loss_fn: Callable[..., torch.Tensor] | None = None):
        if batches is None and loss_fn is None:
            raise ValueError("CapabilitySource needs batches, a loss_fn, or both")
        if batches is not None and (isinstance(batches, (torch.Tensor, str, bytes, Mapping))
                                    or not isinstance(batches, Iterable)):
            raise TypeError(f"batches must be an iterable of batches (a DataLoader, a list of dicts), "
                            f"got {type(batches).__name__}")
        if batches is not None:
            _refuse_model_or_tensor(batches, "batches")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable")
        if loss_fn is not None and not _binds(loss_fn, 1 if batches is None else 2):
            want = "(model) -> loss (no batches given)" if batches is None else "(model, batch) -> loss"
            raise TypeError(f"loss_fn must take {want}")
        self.batches, self.loss_fn = batches, loss_fn
        self._it = None
        self._position = 0          # batches drawn from the current pass
        self._pass_rng: dict[str, Any] | None = None   # the RNG states right before the current pass began
        self._resume: dict[str, Any] | None = None

    def _next_batch(self) -> Any:
        if self._resume is not None:
            self._fast_forward()
        for attempt in range(2):
            if self._it is None:
                self._pass_rng = _rng_snapshot(self.batches)
                self._it = iter(self.batches)
                self._position = 0
            try:
                batch = next(self._it)
                self._position += 1
                check, self._first_check = getattr(self, "_first_check", None), None
                if check is not None:   # not a list/DataLoader, so not pulled ahead at attach(): its first batch
                    from .._batches import check_batch
                    check_batch(check[0], batch, where=check[1], needs_loss=True, one_shot=True)
                return batch
            except StopIteration:
                self._it = None
        raise ValueError("the reference batches are empty (or a one-shot iterator that is exhausted); "
                         "pass a re-iterable such as a list or a DataLoader")

    def state_dict(self) -> dict[str, Any]:
        """The stream position: batches drawn from the current pass and the RNG states it began with."""
        if self.batches is None or self._it is None:
            return {"position": 0, "rng": None}
        return {"position": self._position, "rng": self._pass_rng}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position at the next batch: the pass is re-begun under its saved RNG states
        (so a shuffled DataLoader draws the same order) and the batches already used are skipped."""
        self._it, self._resume = None, dict(state)

    def _fast_forward(self) -> None:
        state, self._resume = self._resume, None
        position, rng = int(state.get("position", 0)), state.get("rng")
        if self.batches is None or rng is None:
            return
        now = _rng_snapshot(self.batches)
        _rng_restore(self.batches, rng, generators=True)
        self._pass_rng, self._it = rng, iter(self.batches)
        try:
            for _ in range(position):
                next(self._it)
        except StopIteration:
            raise ValueError(f"resuming the capability stream: the reference batches have fewer than the "
                             f"{position} batches drawn before the checkpoint") from None
        finally:
            # The trainer restored its own RNG for this step; replaying the pass must not consume it. The
            # loader's own generators stay where the replay left them, as in the uninterrupted run.
            _rng_restore(self.batches, now, generators=False)
        self._position = position

    def loss(self, model: torch.nn.Module, device: torch.device) -> torch.Tensor:
        if self.batches is None:
            return self.loss_fn(model)
        batch = _to_device(self._next_batch(), device)
        return (self.loss_fn or _default_loss)(model, batch)

    def __repr__(self) -> str:
        return f"CapabilitySource(batches={type(self.batches).__name__}, loss_fn={self.loss_fn!r})"


def _binds(fn: Callable[..., Any], n: int) -> bool:
    """Whether ``fn`` can be called with ``n`` positional arguments (True when its signature is unknown)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(*([None] * n))
    except TypeError:
        return False
    return True


_REFERENCE_KINDS = ("capability batches (model(**batch).loss is used), a callable (model) -> loss, "
                    "CapabilitySource(batches, loss_fn=...), EMA(...) or a Subspace")


def _refuse_model_or_tensor(value: Any, name: str) -> None:
    if isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} is a torch.nn.Module ({type(value).__name__}): attach() does not take a model as "
                        f"the reference (it uses the trainer's own model); pass {_REFERENCE_KINDS}")
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} is a tensor (a loss computed once?): the capability loss must be recomputed at "
                        f"every refresh; pass {_REFERENCE_KINDS}")


def _as_source(reference: Any) -> CapabilitySource:
    if isinstance(reference, CapabilitySource):
        return reference
    if isinstance(reference, (Subspace, EMA)):
        raise TypeError(f"{type(reference).__name__} cannot be the source of an EMA")
    _refuse_model_or_tensor(reference, "reference")
    if callable(reference) and not isinstance(reference, Iterable):
        if not _binds(reference, 1):
            if _binds(reference, 2):
                raise TypeError("a reference callable takes (model) and returns the capability loss; for "
                                "(model, batch) pass CapabilitySource(batches, loss_fn=...)")
            if _binds(reference, 0):
                raise TypeError("a reference callable for attach() takes the model: (model) -> loss (attach passes "
                                "the trainer's DDP/FSDP-wrapped module); got one that takes no arguments. Use "
                                "reference=lambda model: ... (ProjectedOptimizer(reference_fn=...) is the one "
                                "called with no arguments)")
            raise TypeError("a reference callable takes (model) and returns the capability loss")
        return CapabilitySource(None, reference)
    return CapabilitySource(reference)


class EMA:
    """An exponential moving average of capability gradients: ``attach(trainer, reference=EMA(loader, beta=0.9))``.

    Each refresh folds the fresh capability gradient in (``e <- beta e + (1 - beta) g``; the first one is
    copied). Memory: one copy of the trainable parameters in ``reference_dtype`` (``attach`` argument; default
    the gradient's dtype). Non-finite or all-zero captures are not folded in. Saved in trainer checkpoints.

    Args:
        source: what :class:`CapabilitySource` accepts (iterable of batches, callable ``(model) -> loss``) or a
            ``CapabilitySource``.
        beta: decay in [0, 1).
    """

    def __init__(self, source: Any, *, beta: float = 0.9):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.source = _as_source(source)
        self.beta = float(beta)
        self.buffers: list[torch.Tensor | None] = []
        self.count = 0

    def fold(self, captured: list[torch.Tensor | None], inv_scale: float, dtype: torch.dtype | None) -> bool:
        present = [t for t in captured if t is not None]
        if not present:
            return False
        sq = sum(float(torch.linalg.vector_norm(t.float()) ** 2) for t in present)
        if not math.isfinite(sq) or sq == 0.0:
            return False
        if self.buffers and len(self.buffers) != len(captured):
            raise ValueError(f"the optimizer's parameter list changed size ({len(self.buffers)} -> "
                             f"{len(captured)}) since the EMA was created")
        if not self.buffers:
            self.buffers = [None] * len(captured)
        first = self.count == 0
        for i, t in enumerate(captured):
            if t is None:
                continue
            d = dtype or t.dtype
            if self.buffers[i] is None or first:
                self.buffers[i] = t.to(d, copy=True).mul_(inv_scale) if inv_scale != 1.0 else t.to(d, copy=True)
            else:
                self.buffers[i].mul_(self.beta).add_(t.to(d), alpha=(1.0 - self.beta) * inv_scale)
        self.count += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "count": self.count,
                "buffers": [None if t is None else t.detach().clone() for t in self.buffers]}

    def load_state_dict(self, state: Mapping[str, Any], params: list[torch.Tensor] | None = None) -> None:
        buffers = list(state["buffers"])
        if params is not None:
            if buffers and len(buffers) != len(params):
                raise ValueError(f"EMA state covers {len(buffers)} parameters, the optimizer has {len(params)}")
            for i, (t, p) in enumerate(zip(buffers, params)):
                if t is not None and tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"EMA state tensor {i} has shape {tuple(t.shape)}, parameter has "
                                     f"{tuple(p.shape)}")
            buffers = [None if t is None else t.to(p.device) for t, p in zip(buffers, params)]
        self.buffers = buffers
        self.count = int(state["count"])

    def __repr__(self) -> str:
        return f"EMA(beta={self.beta}, count={self.count}, source={self.source!r})"


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm of a tensor list (float64, no host sync). DTensors (FSDP2/HSDP) are reduced over the mesh
    dimensions they are sharded (or partial) on, one all-reduce per (mesh, placements) group."""
    plain = [t for t in tensors if not hasattr(t, "to_local")]
    total = torch.zeros((), dtype=torch.float64, device=tensors[0].device if tensors else "cpu")
    if plain:
        total = total.to(plain[0].device) + torch.stack(
            [n.to(torch.float64) ** 2 for n in torch._foreach_norm(plain)]).sum()
    groups: dict[Any, list[torch.Tensor]] = {}
    for t in tensors:
        if hasattr(t, "to_local"):
            groups.setdefault((id(t.device_mesh), tuple(t.placements)), []).append(t)
    for ts in groups.values():
        mesh, placements = ts[0].device_mesh, ts[0].placements
        local = [t.to_local() for t in ts]
        sq = torch.stack([n.to(torch.float64) ** 2 for n in torch._foreach_norm(local)]).sum()
        import torch.distributed as dist
        for dim, pl in enumerate(placements):
            if not pl.is_replicate():
                dist.all_reduce(sq, group=mesh.get_group(dim))
        total = total.to(sq.device) + sq
    return total.sqrt()


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------
def _transformers_reentrant_default() -> bool:
    """Whether the installed transformers checkpoints reentrantly when ``use_reentrant`` is not given."""
    try:
        import transformers
        return int(transformers.__version__.split(".")[0]) < 5   # v5 defaults to use_reentrant=False
    except Exception:  # pragma: no cover
        return True


def _post_accumulate_hooked(params: Iterable[torch.Tensor]) -> bool:
    return any(bool(getattr(p, "_post_accumulate_grad_hooks", None)) for p in params)


_OIB_MSG = ("this trainer applies optimizer updates inside backward ({what}), so no accumulated gradient exists "
            "at the end of training_step to project. Use a regular optimizer (e.g. optim='adamw_torch'; "
            "non-layer-wise 'galore_adamw' works), or project in your own loop with "
            "atax_kernels.ProjectedOptimizer.")


def _check_supported(trainer: Any) -> None:
    args = getattr(trainer, "args", None)
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise NotImplementedError(
            "atax attach() does not support DeepSpeed: ZeRO partitions and reduces gradients inside its engine "
            "(no full .grad after training_step). Use DDP or FSDP2 (accelerate/torchrun without a DeepSpeed "
            "config), or a custom loop with atax_kernels.ProjectedOptimizer."
        )
    optim = str(getattr(getattr(args, "optim", ""), "value", getattr(args, "optim", ""))).lower()
    if "lomo" in optim:
        raise NotImplementedError("atax attach() refuses optim=%r: " % optim + _OIB_MSG.format(what="LOMO/AdaLomo"))
    if "galore" in optim and "layerwise" in optim:
        raise NotImplementedError("atax attach() refuses optim=%r: " % optim
                                  + _OIB_MSG.format(what="layer-wise GaLore"))
    model = getattr(trainer, "model", None)
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    opt = getattr(trainer, "optimizer", None)
    if opt is not None and hasattr(opt, "param_groups"):
        params += [p for g in opt.param_groups for p in g["params"]]
    if _post_accumulate_hooked(params):
        raise NotImplementedError("atax attach() found parameters with post-accumulate-grad hooks: "
                                  + _OIB_MSG.format(what="register_post_accumulate_grad_hook"))
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


# ---------------------------------------------------------------------------------------------------------------
# The handle
# ---------------------------------------------------------------------------------------------------------------
class AtaxHandle:
    """Returned by :func:`attach`. ``detach()`` restores the trainer.

    Attributes:
        last_stats: the :class:`~atax_kernels.ProjectionStats` of the latest projection (None before).
        last_ref_norm: ``[k]`` float64 tensor, norms of the references of the latest projection (unscaled).
        steps: optimizer steps projected so far (restored from checkpoints).
        reference: the normalised reference (``CapabilitySource``, ``EMA`` or ``Subspace``).
    """

    def __init__(self, trainer, reference, mode, strength, granularity, refresh_every, reference_dtype, backend):
        self.trainer = trainer
        self.mode, self.strength, self.granularity = mode, strength, granularity
        self.refresh_every, self.reference_dtype, self.backend = refresh_every, reference_dtype, backend
        self.reference = reference
        self.last_stats: ProjectionStats | None = None
        self.last_ref_norm: torch.Tensor | None = None
        self.steps = 0
        self._live: list[torch.Tensor | None] | None = None
        self._live_inv_scale = 1.0
        self._unlogged = False
        self._resume_state: dict[str, Any] | None = None
        self._attached = False
        self._saved: dict[str, Any] = {}
        self.callback = None

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
            """Writes the atax reference state into each checkpoint folder."""

            def on_save(self, args, state, control, **kwargs):
                handle._write_checkpoint(args, state)
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
        for h in getattr(self, "_act_hooks", []):
            h.remove()
        self._act_hooks, self._act_opt = [], None
        self._attached = False
        self._live = None

    @property
    def attached(self) -> bool:
        return self._attached

    # -- the step ------------------------------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        opt = self.trainer.optimizer
        if opt is None:
            raise RuntimeError("trainer.optimizer is None at a training step; atax needs the trainer's optimizer")
        return [p for g in opt.param_groups for p in g["params"]]

    def _inv_scale(self) -> float:
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
            return 1.0
        return 1.0 / float(scaler.get_scale())

    def _capture(self, model: torch.nn.Module, params: list[torch.Tensor], source: CapabilitySource
                 ) -> list[torch.Tensor | None]:
        """Stash the safety grads, backprop the capability loss, take its grads, restore the safety grads."""
        t = self.trainer
        stash: list[torch.Tensor | None] = []
        for p in params:
            g = p.grad
            # Views of a shared buffer (DDP gradient_as_bucket_view) would be overwritten by the next backward.
            stash.append(None if g is None else (g.detach().clone() if g._base is not None else g))
            p.grad = None
        try:
            with torch.enable_grad():
                ctx = getattr(t, "compute_loss_context_manager", None)
                with (ctx() if ctx is not None else contextlib.nullcontext()):
                    loss = source.loss(model, t.args.device)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise TypeError(f"the capability loss must be a scalar tensor, got "
                                    f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))}")
                if not loss.requires_grad:
                    raise ValueError("the capability loss does not require grad (computed under no_grad, or "
                                     "from frozen parameters only)")
                t.accelerator.backward(loss)
            captured = []
            for p in params:
                g = p.grad
                captured.append(None if g is None else (g.detach().clone() if g._base is not None else g.detach()))
                p.grad = None
        finally:
            for p, g in zip(params, stash):
                p.grad = g
        return captured

    def _on_sync_step(self, model: torch.nn.Module) -> None:
        params = self._params()
        if isinstance(self.reference, ActivationSubspace):
            return self._activation_sync_step(params)
        if _post_accumulate_hooked(params):
            raise NotImplementedError("atax: parameters gained post-accumulate-grad hooks after attach(): "
                                      + _OIB_MSG.format(what="register_post_accumulate_grad_hook"))
        if self._resume_state is not None:
            self._apply_resume_state(params)
        ref = self.reference
        due = self.steps % self.refresh_every == 0
        if isinstance(ref, CapabilitySource) and (due or self._live is None):
            self._live = None   # free the old reference before the capability backward
            self._live = self._capture(model, params, ref)
            self._live_inv_scale = self._inv_scale()
        elif isinstance(ref, EMA) and (due or ref.count == 0):
            captured = self._capture(model, params, ref.source)
            ref.fold(captured, self._inv_scale(), self.reference_dtype)
            del captured
        self.steps += 1

        if isinstance(ref, Subspace):
            if ref.rank == 0:
                return
            if len(ref.shapes) != len(params):
                raise ValueError(f"the Subspace covers {len(ref.shapes)} tensors, the optimizer has {len(params)} "
                                 f"parameters (build it from [p for g in optimizer.param_groups for p in g['params']])")
            refs, scales = [list(v) for v in ref.basis], [1.0] * ref.rank
        elif isinstance(ref, EMA):
            if ref.count == 0:
                return
            refs, scales = [ref.buffers], [1.0]
        else:
            refs, scales = [self._live], [self._live_inv_scale]

        idx = [i for i, p in enumerate(params) if p.grad is not None and all(r[i] is not None for r in refs)]
        if not idx:
            return
        grads = [params[i].grad for i in idx]
        if isinstance(ref, Subspace) and len(idx) == len(params):
            ref_arg: Any = ref   # orthonormal shortcut (no solve)
        else:
            ref_arg = [[r[i] for i in idx] for r in refs]
        stats = project_(grads, ref_arg, mode=self.mode, strength=self.strength, granularity=self.granularity,
                         backend=self.backend)
        with torch.no_grad():
            self.last_ref_norm = torch.stack([_global_norm([r[i] for i in idx]) * s for r, s in zip(refs, scales)])
        self.last_stats = stats
        self._unlogged = True
        self._window_add(self._step_values(stats, self.last_ref_norm), skipped=stats.skipped)
        if isinstance(ref, CapabilitySource) and self.refresh_every == 1:
            self._live = None   # not reused: free it now

    # -- logging -------------------------------------------------------------------------------------------
    # -- activation subspace (reference=ActivationSubspace) ------------------------------------------------
    def _observe_training_batch(self, args: tuple, kwargs: dict) -> Any:
        """With an ActivationSubspace of contrast > 0: the training batch's own forward is the safety side."""
        sub = self.reference
        if isinstance(sub, ActivationSubspace) and self._resume_state is not None:
            # Before this batch is observed: loading replaces the moments gathered since the last update()
            # with the checkpoint's (the safety side between refreshes), so the resumed run is bit-exact.
            self._apply_resume_state(self._params())
        if not isinstance(sub, ActivationSubspace) or sub.contrast == 0:
            return contextlib.nullcontext()
        inputs = args[1] if len(args) > 1 else kwargs.get("inputs")
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        return sub.observe(side="safety", attention_mask=mask)

    def _activation_sync_step(self, params: list[torch.Tensor]) -> None:
        """Refresh the bases when due and make sure the optimizer's step projects its realised update."""
        sub = self.reference
        if self._resume_state is not None:
            self._apply_resume_state(params)
        due = self.steps % self.refresh_every == 0 and (self.steps > 0 or sub.contrast > 0 or sub.updates == 0)
        if due and sub.loader is not None:
            sub.refresh()
        elif due:
            sub.update()
        self.steps += 1
        opt = self.trainer.optimizer
        while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
            opt = opt.optimizer   # accelerate's AcceleratedOptimizer wraps the torch optimizer
        if getattr(self, "_act_opt", None) is not opt:
            for h in getattr(self, "_act_hooks", []):
                h.remove()
            self._act_opt = opt
            self._act_hooks = [opt.register_step_pre_hook(lambda o, a, k: self._act_before_step()),
                               opt.register_step_post_hook(lambda o, a, k: self._act_after_step())]

    def _act_before_step(self) -> None:
        managed = {id(p) for p in self._params()}
        self._act_params = [p for p in self.reference.parameters() if id(p) in managed]
        self._act_deltas = [_local_tensor(p.detach()).clone() for p in self._act_params]

    @torch.no_grad()
    def _act_after_step(self) -> None:
        params, deltas = getattr(self, "_act_params", None), getattr(self, "_act_deltas", None)
        self._act_params = self._act_deltas = None
        if not params:
            return
        now = [_local_tensor(p.detach()) for p in params]
        torch._foreach_sub_(deltas, now)
        torch._foreach_neg_(deltas)        # realised update dW = new - old
        torch._foreach_sub_(now, deltas)   # back to old
        try:
            self.last_activation = self.reference.project_updates_(params, deltas, backend=self.backend)
        except BaseException:
            torch._foreach_add_(now, deltas)  # deltas untouched on error: leave the plain step, then raise
            raise
        torch._foreach_add_(now, deltas)   # old + projected dW
        self._unlogged = True
        a = self.last_activation
        frac = a.update_removed_fraction.detach().to(torch.float64).reshape(())
        values = {"feature_rank_mean": torch.full((), a.feature_rank_mean, dtype=torch.float64, device=frac.device),
                  "update_removed_fraction": frac}
        if a.lora_b_rank_max is not None:  # LoRA: B's factor shown too (0 with lora="input": B trains freely)
            values["lora_b_rank_max"] = torch.full((), float(a.lora_b_rank_max), dtype=torch.float64,
                                                   device=frac.device)
        self._window_add(values)

    def _activation_log_values(self) -> dict[str, float]:
        means = self._window_means()
        if means is not None:
            return {f"atax/{k}": float(v) for k, v in means[0].items()}
        a = getattr(self, "last_activation", None)
        if a is None:
            return {}
        out = {"atax/feature_rank_mean": float(a.feature_rank_mean),
               "atax/update_removed_fraction": float(a.update_removed_fraction)}
        if a.lora_b_rank_max is not None:
            out["atax/lora_b_rank_max"] = float(a.lora_b_rank_max)
        return out

    # -- the logging window: atax/* are means over the optimizer steps since the previous log, as HF's loss --
    def _step_values(self, s: ProjectionStats, ref_norm: torch.Tensor) -> dict[str, torch.Tensor]:
        """This step's loggable values as float64 device tensors (no host sync)."""
        values = {"cosine": s.cosines.detach().to(torch.float64),
                  "removed_fraction": s.removed_fraction.detach().to(torch.float64).reshape(()),
                  "ref_norm": ref_norm.detach().to(torch.float64).to(s.cosines.device)}
        if getattr(self, "log_tax_rate", False):
            if s.cosines.numel() == 1:
                values["tax_rate"] = values["cosine"][0] ** 2
            elif self.mode == "orthogonal" and self.granularity == "global" and self.strength > 0:
                values["tax_rate"] = torch.clamp((values["removed_fraction"] / self.strength) ** 2, max=1.0)
        return values

    def _window_add(self, values: dict[str, torch.Tensor], skipped: torch.Tensor | None = None) -> None:
        """Add one step to the logging window. A change in the values' shapes (the number of references grew)
        restarts the window at this step."""
        shapes = {k: tuple(v.shape) for k, v in values.items()}
        w = getattr(self, "_window", None)
        if w is None or w["shapes"] != shapes:
            dev = next(iter(values.values())).device
            w = self._window = {"shapes": shapes, "n": 0, "n_ok": torch.zeros((), dtype=torch.float64, device=dev),
                                "all": {k: torch.zeros_like(v) for k, v in values.items()},
                                "ok": {k: torch.zeros_like(v) for k, v in values.items()}}
        ok = (torch.ones((), dtype=torch.bool, device=w["n_ok"].device) if skipped is None
              else ~skipped.detach().to(w["n_ok"].device))
        for k, v in values.items():
            w["all"][k] += v
            w["ok"][k] += torch.where(ok, v, torch.zeros_like(v))
        w["n"] += 1
        w["n_ok"] += ok.to(torch.float64)

    def _window_means(self) -> tuple[dict[str, Any], int, int] | None:
        """(means, steps, non-skipped steps) of the window, or None when it is empty. One host sync.

        Values average the non-skipped steps (all steps when every one was skipped)."""
        w = getattr(self, "_window", None)
        if w is None or w["n"] == 0:
            return None
        n, n_ok = w["n"], int(round(float(w["n_ok"])))
        src, div = (w["ok"], n_ok) if n_ok > 0 else (w["all"], n)
        return {k: (v / div).cpu().tolist() for k, v in src.items()}, n, n_ok

    def log_values(self) -> dict[str, float]:
        """The ``atax/*`` values as Python floats (one host sync): means over the optimizer steps since the
        previous log (the trainer's ``logging_steps`` window, as HF averages ``loss``). ``atax/skipped`` is the
        fraction of those steps that were skipped; the other values average the steps that were not. With
        nothing accumulated (e.g. right after a log), the latest projection's values."""
        if isinstance(getattr(self, "reference", None), ActivationSubspace):
            return self._activation_log_values()
        means = self._window_means()
        if means is not None:
            return self._window_log_values(*means)
        s = self.last_stats
        if s is None:
            return {}
        cos = s.cosines.detach().cpu().tolist()
        norms = self.last_ref_norm.detach().cpu().tolist() if self.last_ref_norm is not None else []
        out: dict[str, float] = {}
        if len(cos) == 1:
            out["atax/cosine"] = float(cos[0])
        else:
            out.update({f"atax/cosine/{j}": float(c) for j, c in enumerate(cos)})
        out["atax/removed_fraction"] = float(s.removed_fraction)
        out["atax/skipped"] = float(bool(s.skipped))
        if getattr(self, "log_tax_rate", False) and not bool(s.skipped):
            if len(cos) == 1:
                out["atax/tax_rate"] = float(cos[0]) ** 2
            elif self.mode == "orthogonal" and self.granularity == "global" and self.strength > 0:
                out["atax/tax_rate"] = min(1.0, (float(s.removed_fraction) / self.strength) ** 2)
        if len(norms) == 1:
            out["atax/ref_norm"] = float(norms[0])
        else:
            out.update({f"atax/ref_norm/{j}": float(n) for j, n in enumerate(norms)})
        return out

    @staticmethod
    def _window_log_values(means: dict[str, Any], n: int, n_ok: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for key in ("cosine", "ref_norm"):
            vals = means[key]
            if len(vals) == 1:
                out[f"atax/{key}"] = float(vals[0])
            else:
                out.update({f"atax/{key}/{j}": float(c) for j, c in enumerate(vals)})
        out["atax/removed_fraction"] = float(means["removed_fraction"])
        out["atax/skipped"] = (n - n_ok) / n
        if "tax_rate" in means and n_ok > 0:
            out["atax/tax_rate"] = float(means["tax_rate"])
        return out

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        ref = self.reference
        state: dict[str, Any] = {"version": 1, "steps": self.steps, "kind": type(ref).__name__,
                                 "settings": {"mode": self.mode, "strength": self.strength,
                                              "granularity": self.granularity, "refresh_every": self.refresh_every}}
        if isinstance(ref, EMA):
            state["ema"] = ref.state_dict()
        if isinstance(ref, Subspace):
            state["subspace"] = ref.state_dict()
        if isinstance(ref, ActivationSubspace):
            state["activation"] = ref.state_dict()
        source = ref.source if isinstance(ref, EMA) else ref if isinstance(ref, CapabilitySource) else None
        if source is not None:
            state["source"] = source.state_dict()
        if isinstance(ref, CapabilitySource) and self._live is not None:
            # Reused until the next refresh (refresh_every > 1): without it a resumed run would refresh early.
            state["live"] = {"grads": [None if t is None else t.detach() for t in self._live],
                             "inv_scale": self._live_inv_scale}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (applied at the next projected step)."""
        kind = state.get("kind")
        if kind != type(self.reference).__name__:
            raise ValueError(f"atax checkpoint holds a {kind} reference state but this handle's reference is a "
                             f"{type(self.reference).__name__}")
        self._resume_state = dict(state)

    def _apply_resume_state(self, params: list[torch.Tensor]) -> None:
        state, self._resume_state = self._resume_state, None
        self.steps = int(state["steps"])
        if isinstance(self.reference, EMA) and "ema" in state:
            self.reference.load_state_dict(state["ema"], params)
        if isinstance(self.reference, ActivationSubspace) and "activation" in state:
            self.reference.load_state_dict(state["activation"])
        if isinstance(self.reference, Subspace) and "subspace" in state:
            self.reference.load_state_dict(state["subspace"])
        source = (self.reference.source if isinstance(self.reference, EMA)
                  else self.reference if isinstance(self.reference, CapabilitySource) else None)
        if source is not None and "source" in state:
            source.load_state_dict(state["source"])
        if isinstance(self.reference, CapabilitySource) and "live" in state:
            grads = state["live"]["grads"]
            if len(grads) != len(params):
                raise ValueError(f"the checkpoint's live reference covers {len(grads)} parameters, the optimizer "
                                 f"has {len(params)}")
            self._live = [None if t is None else t.to(p.device) for t, p in zip(grads, params)]
            self._live_inv_scale = float(state["live"]["inv_scale"])

    def _rank_file(self) -> str:
        acc = self.trainer.accelerator
        if getattr(acc, "num_processes", 1) > 1:
            return f"atax_reference_rank{acc.process_index}.pt"
        return REFERENCE_FILE

    def _write_checkpoint(self, args: Any, state: Any) -> None:
        t = self.trainer
        out_dir = t._get_output_dir(trial=None) if hasattr(t, "_get_output_dir") else args.output_dir
        folder = os.path.join(out_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        payload = self.state_dict()
        if self._resume_state is not None:   # saved before any step ran since the resume: keep what was loaded
            payload = dict(self._resume_state)
        torch.save(payload, os.path.join(folder, self._rank_file()))

    def _read_checkpoint(self, folder: str) -> None:
        path = os.path.join(folder, self._rank_file())
        if not os.path.isfile(path):
            warnings.warn(f"atax: {path} not found; the reference state starts fresh (the checkpoint was saved "
                          f"without atax attached?)", stacklevel=2)
            return
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def __repr__(self) -> str:
        sub = self.reference
        if isinstance(sub, ActivationSubspace):   # what runs: no gradient projection, so no mode/strength
            return (f"AtaxHandle(activation: energy={sub.energy:g}, contrast={sub.contrast:g}, "
                    f"refresh_every={self.refresh_every}, modules={len(sub._entries)}, steps={self.steps}, "
                    f"attached={self._attached})")
        return (f"AtaxHandle(mode={self.mode!r}, strength={self.strength}, granularity={self.granularity!r}, "
                f"reference={self.reference!r}, steps={self.steps}, attached={self._attached})")


_MISSING = object()


def _local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _refuse_gradient_settings(ref: Any, *, mode: str, strength: float, granularity: str, log_tax_rate: bool) -> None:
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


def _check_capability_batches(trainer: Any, ref: Any) -> None:
    """Gradient references from batches with the default loss: the first batch must hold the model's inputs
    and labels (model(**batch).loss). Peeked without consuming (a list, a DataLoader); any other iterable (a
    generator, ...) is checked when its first batch is drawn."""
    from .._batches import check_first

    source = ref.source if isinstance(ref, EMA) else ref if isinstance(ref, CapabilitySource) else None
    if source is None or source.batches is None or source.loss_fn is not None:
        return
    where = f"the capability loader of attach(reference={'EMA(...)' if isinstance(ref, EMA) else '...'})"
    if not check_first(trainer.model, source.batches, where=where, needs_loss=True):
        source._first_check = (trainer.model, where)


def _check_activation_reference(trainer: Any, sub: ActivationSubspace) -> None:
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


def attach(
    trainer: Any,
    *,
    reference: Any,
    mode: str = "orthogonal",
    strength: float = 1.0,
    granularity: str = "global",
    refresh_every: int = 1,
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
        reference_dtype: EMA buffer dtype (``torch.bfloat16`` halves its memory); default the gradient's.
        log_tax_rate: also log ``atax/tax_rate``: the :func:`atax_kernels.tax.tax_rate` of this step's safety
            gradient against the reference span (one sample each, so it is the fraction of ``|g|^2`` inside
            the span: ``cos^2`` for one reference; for several, ``(removed_fraction / strength)^2`` in
            orthogonal mode). Free: computed from the projection's statistics, no extra pass.

    Returns:
        An :class:`AtaxHandle` (``handle.detach()`` undoes everything; ``handle.last_stats``).

    Raises:
        NotImplementedError: DeepSpeed, optimizer-in-backward (LOMO/AdaLomo, layer-wise GaLore, post-accumulate
            grad hooks), reentrant gradient checkpointing; the message says what to use instead.
        TypeError, ValueError: bad arguments (among them a model, a tensor or a zero-argument callable as
            ``reference``), or a trainer that already has atax attached; capability batches (for gradient
            references with the default loss) whose first batch lacks the model's inputs or labels, or is not a
            dict (a list or a DataLoader is looked at here, nothing consumed; another iterable when its first
            batch is drawn).
    """
    _check_supported(trainer)
    for name in ("training_step", "log", "add_callback", "remove_callback", "accelerator", "args"):
        if not hasattr(trainer, name):
            raise TypeError(f"trainer must be a transformers.Trainer (missing .{name}), got {type(trainer).__name__}")
    if getattr(trainer, "_atax_handle", None) is not None:
        raise ValueError("atax is already attached to this trainer; call handle.detach() first")
    V.check_choice(mode, "mode", MODES)
    V.check_choice(granularity, "granularity", GRANULARITIES)
    strength = V.check_strength(strength)
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(f"refresh_every must be a positive int, got {refresh_every!r}")
    if reference_dtype is not None and reference_dtype not in V.SUPPORTED_DTYPES:
        raise TypeError(f"reference_dtype must be a floating dtype, got {reference_dtype}")
    if backend is not None:
        V.check_choice(backend, "backend", ("torch", "cpu", "cuda", "triton"))
    if reference is None:
        raise ValueError("reference is required: capability batches, a callable (model) -> loss, EMA(...), "
                         "or a Subspace")
    if isinstance(reference, ActivationSubspace):
        _check_activation_reference(trainer, reference)
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
        ref = _as_source(reference)
        if reference_dtype is not None:
            warnings.warn("reference_dtype only applies to EMA references", stacklevel=2)
    _refuse_gradient_settings(ref, mode=mode, strength=strength, granularity=granularity, log_tax_rate=log_tax_rate)
    _check_capability_batches(trainer, ref)
    handle = AtaxHandle(trainer, ref, mode, strength, granularity, refresh_every, reference_dtype, backend)
    handle.log_tax_rate = bool(log_tax_rate)
    handle._install()
    return handle
