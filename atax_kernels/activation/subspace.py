"""``ActivationSubspace``: the per-layer bases of the capability data's input activations, and the object that
holds them (see the package docstring, ``atax_kernels/activation/__init__.py``, for what it protects and how)."""
from __future__ import annotations

import contextlib
import itertools
import math
import sys
import warnings
import weakref
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .._dtensor import is_dtensor, local
from .stats import ActivationStats

__all__ = ["ActivationSubspace", "ActivationStats"]

SIDES = ("capability", "safety")
FREE_OR_FREEZE = ("free", "freeze")
#: Which positions of a loader batch are observed; see ``ActivationSubspace.observe_loader(positions=...)``.
POSITIONS = ("all", "answer", "prompt")
#: How each observed position counts in the second moment; see ``ActivationSubspace(weighting=...)``.
WEIGHTINGS = ("token", "energy")
#: How a LoRA layer is protected; see ``ActivationSubspace(lora=...)``.
LORA_RULES = ("input", "both")
#: A step that removes at least this fraction of every protected update (by norm) is reported once.
SATURATED_FRACTION = 0.999
#: Above this input dimension the basis comes from warm-started subspace iteration, not a full eigh.
EIGH_MAX_DIM = 2048
#: Eigenvalues below this fraction of the largest are round-off of a moment summed from products of this dtype
#: (float32: a few eps of |X|^2), never counted as directions.
ROUND_OFF = {torch.float64: 1e-12, torch.float32: 1e-6}
#: Full eigh in float64 up to this input dimension, float32 above it (up to ``EIGH_MAX_DIM``).
EIGH_FLOAT64_MAX_DIM = 1024


def _is_conv1d(m: nn.Module) -> bool:
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, "Conv1D", None) if mod is not None else None
    return cls is not None and isinstance(m, cls)


def _lora_kind(m: nn.Module) -> str | None:
    """'linear' for a PEFT LoRA Linear, 'unsupported' for other LoRA layers, None otherwise."""
    mod = sys.modules.get("peft.tuners.lora.layer")
    base = getattr(mod, "LoraLayer", None) if mod is not None else None
    if base is None or not isinstance(m, base):
        return None
    a = getattr(m, "lora_A", None)
    if isinstance(a, nn.ModuleDict) and len(a) and all(isinstance(v, nn.Linear) for v in a.values()) \
            and not any(bool(v) for v in getattr(m, "use_dora", {}).values()):
        return "linear"
    return "unsupported"


def _is_norm(m: nn.Module) -> bool:
    name = type(m).__name__
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or name.endswith("Norm") or "RMSNorm" in name


class _Group:
    """One distinct input: its accumulators, token counts and basis (shared by the modules that read it)."""

    def __init__(self, d_in: int, device: torch.device) -> None:
        self.d_in, self.device = d_in, device
        self.members: list[str] = []
        self.acc: dict[str, torch.Tensor | None] = {s: None for s in SIDES}
        self.count: dict[str, float] = {s: 0.0 for s in SIDES}
        self.stage: dict[str, torch.Tensor | None] = {s: None for s in SIDES}
        self.stage_count: dict[str, float] = {s: 0.0 for s in SIDES}
        self.ema: dict[str, torch.Tensor | None] = {s: None for s in SIDES}
        self.basis: torch.Tensor | None = None
        self.moment: torch.Tensor | None = None  # the matrix the last basis came from (for LoRA B), transient
        self.n_accum = 0
        # relative eigenvalue floor below which directions are round-off: float32 products leave ~1e-7 noise
        self.floor = ROUND_OFF[torch.float64]
        self.pending: dict[str, int] = {}


class _Entry:
    """One protected module."""

    def __init__(self, name: str, module: nn.Module, kind: str) -> None:
        self.name, self.module, self.kind = name, module, kind
        self.group: _Group | None = None
        if kind == "linear":
            self.d_in = module.weight.shape[1]
        elif kind == "conv1d":
            self.d_in = module.weight.shape[0]
        elif kind == "lora":
            self.d_in = next(iter(module.lora_A.values())).in_features
        else:  # embedding
            self.d_in = module.num_embeddings
            self.counts = {s: None for s in SIDES}
            self.stage_counts = {s: None for s in SIDES}
            self.ema_counts = {s: None for s in SIDES}
            self.tokens: torch.Tensor | None = None
        self.lora_b_bases: dict[str, torch.Tensor] = {}


class ActivationSubspace:
    """Per-layer bases of the capability data's input activations; see the module docstring.

    Args:
        model: the model whose modules are protected (its forward is observed through hooks).
        energy: fraction in [0, 1] of each second moment's trace (of its positive part with contrast) the
            basis holds. 1.0 protects every observed direction, 0.0 none.
        contrast: beta >= 0. With beta > 0 the bases are the top eigenvectors of
            ``C_cap / n_cap - beta * C_safety / n_safety`` (``observe(side="safety")`` feeds C_safety).
        max_rank: at most this many basis vectors (protected tokens) per distinct input; None: no cap.
        modules: exactly these modules (objects or names from ``model.named_modules()``) instead of every
            supported one. An unsupported module given here is a TypeError.
        basis_dtype: dtype of the stored bases (float32; bfloat16 halves their memory).
        biases: ``"freeze"`` (default, measured: zero the bias updates of protected modules) or ``"free"``.
        norms: ``"freeze"`` (default, measured: zero the updates of normalisation weights, i.e. the parameters
            of modules named ``*Norm``/``LayerNorm``/``GroupNorm``) or ``"free"``.
        lora: how PEFT LoRA layers (``W + B A``) are protected. ``"input"`` (default): at every ``update()``
            each ``lora_A`` is projected off the layer's input basis (``A <- A - (A U) U^T``; with PEFT's
            ``B = 0`` start this does not change the model) and so are A's updates; then ``B A x = 0`` on the
            protected span whatever B does, so B trains freely on what the capability inputs do not use.
            ``"both"``: A's update with the input basis and B's with the basis of ``A x`` (A itself is never
            edited). B's input ``A x`` is only ``r_lora``-dimensional, so at high energy that basis covers all
            of it and B (which starts at zero) never moves: nothing trains. Kept for adapters that must not be
            edited; a step that removes >= 99.9 % of every update warns.
        weighting: how each observed position counts. ``"token"`` (default): by its direction only
            (``x / |x|``), so ``energy`` is the mean fraction of each capability token's input the basis holds,
            the same statement in every layer. ``"energy"``: by ``|x|^2`` (the raw ``sum x x^T``); pretrained
            transformers have outlier ("massive activation") positions whose one channel then holds most of
            the trace, so a layer can get rank 1-4 at energy 0.99 and be left unprotected. Measured on
            SmolLM2-135M-Instruct, capital-city answers, 368 tokens: raw weighting gave MLP down-projections of
            layers 1 and 9 rank 9 and 8 at energy 0.9 (top eigenvalue 74 % and 82 % of the trace) while the
            other layers got 26-32; by token every layer got 26-35.
        process_group: the data-parallel group to sum second moments over in ``update()`` (default: the
            default group when ``torch.distributed`` is initialised, else no communication).
    """

    EIGH_MAX_DIM = EIGH_MAX_DIM

    def __init__(
        self,
        model: nn.Module,
        *,
        energy: float = 0.99,
        contrast: float = 0.0,
        max_rank: int | None = None,
        modules: Iterable[nn.Module | str] | None = None,
        basis_dtype: torch.dtype = torch.float32,
        biases: str = "freeze",
        norms: str = "freeze",
        lora: str = "input",
        weighting: str = "token",
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.energy = _check_energy(energy)
        self.contrast = _check_contrast(contrast)
        self.max_rank = _check_max_rank(max_rank)
        if not isinstance(basis_dtype, torch.dtype) or not basis_dtype.is_floating_point:
            raise TypeError(f"basis_dtype must be a floating torch.dtype, got {basis_dtype!r}")
        for key, value in (("biases", biases), ("norms", norms)):
            if value not in FREE_OR_FREEZE:
                raise ValueError(f"{key} must be one of {FREE_OR_FREEZE}, got {value!r}")
        if lora not in LORA_RULES:
            raise ValueError(f"lora must be one of {LORA_RULES}, got {lora!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        self.basis_dtype, self.biases, self.norms, self.lora = basis_dtype, biases, norms, lora
        self.process_group = process_group
        self.model = model
        self._entries = self._find_entries(model, modules)
        self._frozen = self._find_frozen(model)
        self._check_no_shared_weights()
        self._groups: list[_Group] = []
        for e in self._entries:
            if e.kind != "embedding":
                self._new_group(e)
        self._observing: str | None = None
        self._mask: torch.Tensor | None = None
        self._seen: dict[tuple, tuple[weakref.ref, _Group]] = {}
        self._handles: list[Any] = []
        self._depth = 0
        self._staged = False
        self._bad: list[str] = []
        self.updates = 0
        self.skipped_batches = 0
        self.last_skip_reason: str | None = None
        self.loader: Any = None
        self.max_batches: int | None = None
        self.forward_fn: Callable[[nn.Module, Any], Any] | None = None
        self._saturation_checks = 0  # steps after an update() whose removed fractions are inspected (host sync)
        self._warned_saturated = False
        self._explicit_mask = False

    # -- discovery ---------------------------------------------------------------------------------
    @staticmethod
    def _kind(m: nn.Module) -> str | None:
        lk = _lora_kind(m)
        if lk == "linear":
            return "lora"
        if lk == "unsupported":
            return "unsupported-lora"
        if isinstance(m, nn.Linear):
            return "linear"
        if _is_conv1d(m):
            return "conv1d"
        if isinstance(m, nn.Embedding):
            return "embedding"
        return None

    def _find_entries(self, model: nn.Module, modules: Iterable[nn.Module | str] | None) -> list[_Entry]:
        named = dict(model.named_modules())
        by_id = {id(m): n for n, m in named.items()}
        entries: list[_Entry] = []
        if modules is not None:
            if isinstance(modules, (nn.Module, str)):
                modules = [modules]
            chosen = list(modules)
            if not chosen:
                raise ValueError("modules is empty: give at least one module to protect (or None for all)")
            seen: set[str] = set()
            for i, m in enumerate(chosen):
                if isinstance(m, str):
                    if m not in named:
                        raise ValueError(f"modules[{i}] = {m!r} is not a module name of the model")
                    name, mod = m, named[m]
                elif isinstance(m, nn.Module):
                    if id(m) not in by_id:
                        raise ValueError(f"modules[{i}] ({type(m).__name__}) is not a submodule of the model")
                    name, mod = by_id[id(m)], m
                else:
                    raise TypeError(f"modules[{i}] is a {type(m).__name__}; expected an nn.Module or a module name")
                kind = self._kind(mod)
                if kind is None or kind == "unsupported-lora":
                    raise TypeError(
                        f"modules[{i}] ({name!r}, {type(mod).__name__}) is not supported: ActivationSubspace "
                        f"protects nn.Linear, transformers Conv1D, nn.Embedding and PEFT LoRA Linear layers "
                        f"(not DoRA, LoRA embeddings or convolutions)"
                    )
                if name in seen:
                    raise ValueError(f"modules[{i}] ({name!r}) is given twice")
                seen.add(name)
                entries.append(_Entry(name, mod, kind))
            return entries
        lora_children: set[int] = set()
        for name, m in named.items():
            if self._kind(m) in ("lora", "unsupported-lora"):
                for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                    sub = getattr(m, attr, None)
                    if isinstance(sub, nn.Module):
                        lora_children.update(id(c) for c in sub.modules())
        for name, m in named.items():
            if id(m) in lora_children:
                continue
            kind = self._kind(m)
            if kind == "unsupported-lora":
                raise TypeError(
                    f"{name!r} ({type(m).__name__}) is a LoRA layer ActivationSubspace does not support (DoRA, "
                    f"LoRA embedding or convolution); pass modules= to protect the others"
                )
            if kind is None:
                continue
            if kind == "lora":
                trainable = any(v.weight.requires_grad for v in m.lora_A.values()) or \
                    any(v.weight.requires_grad for v in m.lora_B.values())
            else:
                trainable = m.weight.requires_grad
            if trainable:
                entries.append(_Entry(name, m, kind))
        if not entries:
            raise ValueError("the model has no trainable nn.Linear, Conv1D, nn.Embedding or LoRA layer to protect")
        return entries

    def _find_frozen(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        out: list[tuple[str, nn.Parameter]] = []
        if self.energy == 0:  # energy 0 protects nothing: nothing frozen either (the step is the plain one)
            return out
        if self.biases == "freeze":
            for e in self._entries:
                b = getattr(e.module, "bias", None)
                if e.kind in ("linear", "conv1d") and isinstance(b, nn.Parameter):
                    out.append((e.name + ".bias", b))
        if self.norms == "freeze":
            for name, m in model.named_modules():
                if _is_norm(m):
                    for pn, p in m.named_parameters(recurse=False):
                        out.append((f"{name}.{pn}", p))
        return out

    def _weights(self, e: _Entry) -> list[tuple[str, nn.Parameter, str]]:
        """(label, parameter, role) of what the entry projects: role 'dense', 'dense_t', 'lora_b', 'rows'."""
        m = e.module
        if e.kind == "linear":
            return [(e.name + ".weight", m.weight, "dense")]
        if e.kind == "conv1d":
            return [(e.name + ".weight", m.weight, "dense_t")]
        if e.kind == "embedding":
            return [(e.name + ".weight", m.weight, "rows")]
        out = []
        for a, lin in m.lora_A.items():
            out.append((f"{e.name}.lora_A.{a}.weight", lin.weight, "dense"))
        if self.lora == "both":  # with lora="input", A x = 0 on the span already: B needs no projection
            for a, lin in m.lora_B.items():
                out.append((f"{e.name}.lora_B.{a}.weight", lin.weight, "lora_b:" + a))
        return out

    def _check_no_shared_weights(self) -> None:
        owner: dict[int, str] = {}
        for e in self._entries:
            for label, p, role in self._weights(e):
                if role == "rows":
                    continue  # row zeroing commutes with a column projection (tied embeddings are fine)
                if id(p) in owner:
                    raise ValueError(
                        f"{label} is the same parameter as {owner[id(p)]}: two column projections of one weight "
                        f"do not compose into one; pass modules= to protect only one of them"
                    )
                owner[id(p)] = label

    def _new_group(self, e: _Entry) -> _Group:
        g = _Group(e.d_in, self._weights(e)[0][1].device)
        g.members.append(e.name)
        g.pending[e.name] = 0
        self._groups.append(g)
        e.group = g
        return g

    # -- observation -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def observe(self, side: str = "capability", attention_mask: torch.Tensor | None = None) -> Iterator["ActivationSubspace"]:
        """Inside: every forward of the model adds its protected modules' input second moments.

        Args:
            side: ``"capability"`` or ``"safety"`` (the latter only with ``contrast`` > 0).
            attention_mask: optional [batch, seq] mask; positions where it is 0 are not counted. Inputs of
                shape [batch, seq, d] or [batch*seq, d] are matched to it.

        A forward whose activations (second moments) are non-finite is not folded in; ``skipped_batches``
        counts them and ``last_skip_reason`` says which modules. Gradients are not needed: run it under
        ``torch.no_grad()`` unless the same forward also trains (then the inputs are read detached).
        """
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if side == "safety" and self.contrast == 0:
            raise ValueError("observe(side='safety') needs contrast > 0 (safety second moments are only used then)")
        if self._observing is not None:
            raise RuntimeError("observe() is already active; contexts do not nest")
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
            if attention_mask.dim() < 1:
                raise ValueError("attention_mask must have at least one dimension ([batch, seq])")
            mask = attention_mask.detach() != 0
        self._observing, self._mask = side, mask
        self._explicit_mask = mask is not None
        self._seen = {}
        self._bad = []
        try:
            for e in self._entries:
                fn = self._hook_rows if e.kind == "embedding" else self._hook_dense
                self._handles.append(e.module.register_forward_pre_hook(
                    (lambda m, a, k, e=e, fn=fn: fn(e, a, k)), with_kwargs=True))
            self._handles.append(self.model.register_forward_pre_hook(
                lambda m, a, k: self._begin_forward(k), with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(lambda m, a, o: self._end_forward()))
            yield self
        except BaseException:
            failed = True
            raise
        else:
            failed = False
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []
            try:
                self._depth = 0
                if failed:
                    self._discard_staged()  # a forward that raised part-way is not folded in
                else:
                    self._commit()
            finally:
                self._observing, self._mask, self._seen = None, None, {}
                self._explicit_mask = False

    def _begin_forward(self, kwargs: dict | None = None) -> None:
        if self._depth == 0:
            self._check_pending()
            self._seen = {}
            if not self._explicit_mask:
                # No mask given to observe(): the model call's own [batch, seq] attention_mask keeps padding
                # out (reference_fn refreshes and hand-written loops pass it to the model, not to observe()).
                am = (kwargs or {}).get("attention_mask")
                self._mask = am.detach() != 0 if isinstance(am, torch.Tensor) and am.dim() == 2 else None
        self._depth += 1

    def _end_forward(self) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self._check_pending()
            self._commit()
            self._seen = {}

    def _check_pending(self) -> None:
        for g in self._groups:
            late = [n for n, c in g.pending.items() if c]
            if late:
                for n in g.pending:
                    g.pending[n] = 0
                raise RuntimeError(
                    f"modules {g.members} were found to share one input tensor, but {late} did not receive it in a "
                    f"later forward; protect them separately (pass modules= with separate ActivationSubspace "
                    f"objects) or observe forwards that call them all"
                )

    @staticmethod
    def _input(args: tuple, kwargs: dict) -> torch.Tensor:
        if args and isinstance(args[0], torch.Tensor):
            return args[0]
        for v in kwargs.values():
            if isinstance(v, torch.Tensor):
                return v
        raise RuntimeError("a protected module was called without a tensor input")

    def _select(self, x: torch.Tensor, d: int, name: str) -> torch.Tensor:
        """Rows [n, d] of x at unmasked positions."""
        if x.shape[-1] != d:
            raise ValueError(f"{name}: input has last dimension {x.shape[-1]}, expected d_in = {d}")
        m = self._mask
        if m is None:
            return x.reshape(-1, d)
        lead = _broadcast_to_mask(x.shape[:-1], m.shape)
        if lead is not None:
            return x.expand(*lead, d)[m.to(x.device)]
        if x.reshape(-1, d).shape[0] == m.numel():
            return x.reshape(-1, d)[m.reshape(-1).to(x.device)]
        raise ValueError(f"{name}: input of shape {tuple(x.shape)} does not match attention_mask {tuple(m.shape)}")

    def _hook_dense(self, e: _Entry, args: tuple, kwargs: dict) -> None:
        orig = self._input(args, kwargs)
        x = orig.detach()
        g = e.group
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)
        hit = self._seen.get(key)
        if hit is not None and hit[0]() is not None:
            owner = hit[1]
            if owner is g:
                g.pending[e.name] = max(0, g.pending[e.name] - 1)
                return
            if g.n_accum == 0 and len(g.members) == 1 and owner.n_accum == 1 and owner.d_in == g.d_in:
                # First sight: this module reads the same tensor as owner's modules: one basis for all.
                self._groups.remove(g)
                owner.members.append(e.name)
                owner.pending[e.name] = 0
                e.group = owner
                return
        if g.pending.get(e.name):
            raise RuntimeError(
                f"modules {g.members} were found to share one input tensor, but {e.name!r} now receives a "
                f"different one; protect them separately (pass modules= with separate ActivationSubspace objects)"
            )
        rows = self._select(x, e.d_in, e.name)
        # float32 products (float64 only for float64 inputs), summed into the float64 accumulator per forward:
        # measured on SmolLM2-135M (121 inputs, 8 x 55 tokens), observe overhead 1.9 -> 1.1 s per batch
        # energy 1 asks for every observed direction: there float32 round-off would decide the rank, so float64
        wd = torch.float64 if x.dtype == torch.float64 or self.energy == 1.0 else torch.float32
        g.floor = max(g.floor, ROUND_OFF[wd])
        r = rows.to(wd)
        if self.weighting == "token":  # direction only: an outlier position counts once, like any other
            r = r / r.norm(dim=1, keepdim=True).clamp_min(torch.finfo(wd).tiny)
        side = self._observing
        inc = r.t() @ r
        if g.stage[side] is None:
            g.stage[side] = inc
        else:
            g.stage[side].add_(inc)
        g.stage_count[side] += float(rows.shape[0])
        g.n_accum += 1
        for n in g.pending:
            if n != e.name:
                g.pending[n] += 1
        self._seen[key] = (weakref.ref(orig), g)  # the caller's tensor: alive while its consumers run
        self._staged = True

    def _hook_rows(self, e: _Entry, args: tuple, kwargs: dict) -> None:
        ids = self._input(args, kwargs)
        if ids.dtype.is_floating_point:
            raise TypeError(f"{e.name}: nn.Embedding input must be integer token ids, got {ids.dtype}")
        m = self._mask
        if m is not None:
            lead = _broadcast_to_mask(ids.shape, m.shape)
            if lead is not None:  # e.g. GPT-2's position ids [1, S] against a [B, S] mask
                ids = ids.expand(*lead)[m.to(ids.device)]
            elif ids.numel() == m.numel():
                ids = ids.reshape(-1)[m.reshape(-1).to(ids.device)]
            else:
                raise ValueError(f"{e.name}: input ids of shape {tuple(ids.shape)} do not match attention_mask "
                                 f"{tuple(m.shape)}")
        side = self._observing
        c = torch.bincount(ids.reshape(-1), minlength=e.d_in).to(torch.float64)
        if e.stage_counts[side] is None:
            e.stage_counts[side] = c
        else:
            e.stage_counts[side].add_(c)
        self._staged = True

    def _discard_staged(self) -> None:
        side = self._observing
        self._staged = False
        for g in self._groups:
            g.stage[side], g.stage_count[side] = None, 0.0
            for n in g.pending:
                g.pending[n] = 0
        for e in self._entries:
            if e.kind == "embedding":
                e.stage_counts[side] = None

    def _commit(self) -> None:
        """Fold this forward's staged moments in if every one is finite (one host sync)."""
        if not self._staged:
            return
        self._staged = False
        side = self._observing
        staged = [g for g in self._groups if g.stage[side] is not None]
        flags = [torch.isfinite(g.stage[side]).all() for g in staged]
        ok = bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True
        for g in self._groups:
            for n in g.pending:
                g.pending[n] = 0
        if not ok:
            bad = [", ".join(g.members) for g, f in zip(staged, flags) if not bool(f)]
            self.skipped_batches += 1
            self.last_skip_reason = (f"non-finite activations in the input of {bad[:4]}"
                                     f"{' and more' if len(bad) > 4 else ''}: the forward was not folded in")
            for g in staged:
                g.stage[side], g.stage_count[side] = None, 0.0
            for e in self._entries:
                if e.kind == "embedding":
                    e.stage_counts[side] = None
            return
        for g in staged:
            if g.acc[side] is None:
                g.acc[side] = g.stage[side].to(torch.float64)
            else:
                g.acc[side].add_(g.stage[side])
            g.count[side] += g.stage_count[side]
            g.stage[side], g.stage_count[side] = None, 0.0
        for e in self._entries:
            if e.kind == "embedding" and e.stage_counts[side] is not None:
                if e.counts[side] is None:
                    e.counts[side] = e.stage_counts[side]
                else:
                    e.counts[side].add_(e.stage_counts[side])
                e.stage_counts[side] = None

    # -- bases -------------------------------------------------------------------------------------
    def update(self, decay: float = 0.0) -> None:
        """Recompute the bases from the second moments observed since the previous ``update()``.

        Args:
            decay: 0 (default) uses only what was observed since the last update; ``decay`` in (0, 1) keeps an
                exponential average ``M <- decay * M + (1 - decay) * C / n`` of the normalised moments.

        Inputs with nothing observed keep their previous basis. Under ``torch.distributed`` the moments and
        counts are summed over the data-parallel group first (a collective call: every rank must call it).
        """
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0.0 <= decay < 1.0):
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
        if self._observing is not None:
            raise RuntimeError("update() inside observe(): leave the observe() context first")
        self._all_reduce()
        for g in self._groups:
            cur = self._moments(g, decay)
            if cur is None:
                continue
            m = cur["capability"] if cur["capability"] is not None else None
            if m is None:
                continue
            if self.contrast > 0 and cur["safety"] is not None:
                m = m - self.contrast * cur["safety"]
                psd = False
            else:
                psd = True
            g.basis = self._basis(m, g.basis, psd, g.floor).to(self.basis_dtype)
            g.moment = m
        for e in self._entries:
            if e.kind == "lora" and self.lora == "both" and e.group.moment is not None:
                self._lora_b_bases(e)
            elif e.kind == "lora" and self.lora == "input":
                self._confine_lora_a(e)
            elif e.kind == "embedding":
                self._tokens(e, decay)
        for g in self._groups:
            g.moment = None
            for s in SIDES:
                g.acc[s], g.count[s] = None, 0.0
        self.updates += 1
        self._saturation_checks = 3

    def _moments(self, g: _Group, decay: float) -> dict[str, torch.Tensor | None] | None:
        out: dict[str, torch.Tensor | None] = {}
        any_new = False
        for s in SIDES:
            new = g.acc[s] / g.count[s] if g.acc[s] is not None and g.count[s] > 0 else None
            any_new = any_new or new is not None
            if decay > 0:
                if new is not None:
                    g.ema[s] = new if g.ema[s] is None else g.ema[s].mul_(decay).add_(new, alpha=1.0 - decay)
                out[s] = g.ema[s]
            else:
                out[s] = new
        return out if any_new else None

    def _basis(self, m: torch.Tensor, prev: torch.Tensor | None, psd: bool,
               floor: float = 1e-12) -> torch.Tensor:
        m = (m + m.t()) * 0.5
        d = m.shape[0]
        if self.energy == 0 or d == 0:
            return m.new_zeros((d, 0))
        if psd and d > self.EIGH_MAX_DIM:
            return _subspace_iteration(m, self.energy, self.max_rank, prev)
        if d > EIGH_FLOAT64_MAX_DIM and m.dtype == torch.float64:
            # Measured (2-core EPYC, d = 1536): float64 eigh 0.38 s, float32 0.19 s, warm subspace iteration at
            # rank ~130 0.69 s; the kept vectors are stored in float32 (or narrower) anyway.
            w, v = torch.linalg.eigh(m.to(torch.float32))
            w, v = w.to(torch.float64), v.to(torch.float64)
            floor = max(floor, ROUND_OFF[torch.float32])
        else:
            w, v = torch.linalg.eigh(m)
        w, v = w.flip(0), v.flip(1)
        k = _select_rank(w, self.energy, self.max_rank, floor)
        return v[:, :k].contiguous()

    def _lora_b_bases(self, e: _Entry) -> None:
        m = e.group.moment
        for a, lin in e.module.lora_A.items():
            A = lin.weight.detach().to(torch.float64)
            mb = A @ m @ A.t()
            e.lora_b_bases[a] = self._basis(mb, None, False, e.group.floor).to(self.basis_dtype)

    @torch.no_grad()
    def _confine_lora_a(self, e: _Entry) -> None:
        """``lora="input"``: rows of every ``lora_A`` off the input basis, so ``B A x = 0`` on the span."""
        u = e.group.basis
        if u is None or u.shape[1] == 0:
            return
        for a, lin in e.module.lora_A.items():
            w = local(lin.weight.detach())  # FSDP2 shards A by rows: each row's projection is local
            wd = torch.float64 if w.dtype == torch.float64 else torch.float32
            uu = u.to(w.device, wd)
            before = float(_sq(w))
            wf = w.to(wd)
            w.copy_((wf - (wf @ uu) @ uu.t()).to(w.dtype))
            if before > 0 and float(_sq(w)) <= 1e-6 * before:
                warnings.warn(
                    f"{e.name}.lora_A.{a}: the protected basis (rank {u.shape[1]} of d_in {e.d_in}) covers every "
                    f"direction its rows had, so the adapter has no room to learn in; lower energy or max_rank",
                    UserWarning, stacklevel=3)

    def _tokens(self, e: _Entry, decay: float) -> None:
        freq: dict[str, torch.Tensor | None] = {}
        any_new = False
        for s in SIDES:
            c = e.counts[s]
            new = c / c.sum() if c is not None and float(c.sum()) > 0 else None
            any_new = any_new or new is not None
            if decay > 0:
                if new is not None:
                    e.ema_counts[s] = new if e.ema_counts[s] is None else \
                        e.ema_counts[s].mul_(decay).add_(new, alpha=1.0 - decay)
                freq[s] = e.ema_counts[s]
            else:
                freq[s] = new
            e.counts[s] = None
        if not any_new or freq["capability"] is None:
            return
        score = freq["capability"]
        if self.contrast > 0 and freq["safety"] is not None:
            score = score - self.contrast * freq["safety"]
        if self.energy == 0:
            e.tokens = torch.zeros(0, dtype=torch.long, device=score.device)
            return
        order = torch.argsort(score, descending=True, stable=True)
        n_pos = int((score > 0).sum())
        if self.max_rank is not None:
            n_pos = min(n_pos, self.max_rank)
        e.tokens = torch.sort(order[:n_pos]).values.to(e.module.weight.device)

    def _all_reduce(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size(self.process_group) == 1:
            return
        parts: list[torch.Tensor] = []
        slots: list[tuple[Any, str, str]] = []
        dev = None
        for g in self._groups:
            for s in SIDES if self.contrast > 0 else ("capability",):
                a = g.acc[s]
                parts.append((a if a is not None else torch.zeros(g.d_in, g.d_in, dtype=torch.float64,
                                                                   device=g.device)).reshape(-1))
                parts.append(torch.tensor([g.count[s]], dtype=torch.float64, device=g.device))
                slots.append((g, s, "dense"))
                dev = dev or g.device
        for e in self._entries:
            if e.kind == "embedding":
                for s in SIDES if self.contrast > 0 else ("capability",):
                    c = e.counts[s]
                    w = e.module.weight
                    parts.append(c if c is not None else torch.zeros(e.d_in, dtype=torch.float64, device=w.device))
                    slots.append((e, s, "rows"))
                    dev = dev or w.device
        if not parts:
            return
        backend = dist.get_backend(self.process_group)
        if backend == "nccl" and dev.type != "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        flat = torch.cat([p.to(dev) for p in parts])
        dist.all_reduce(flat, group=self.process_group)
        off = 0
        for obj, s, kind in slots:
            if kind == "dense":
                n = obj.d_in * obj.d_in
                acc = flat[off:off + n].view(obj.d_in, obj.d_in).to(obj.device)
                cnt = float(flat[off + n])
                off += n + 1
                obj.acc[s], obj.count[s] = (acc if cnt > 0 else None), cnt
            else:
                n = obj.d_in
                c = flat[off:off + n].to(obj.module.weight.device)
                off += n
                obj.counts[s] = c if float(c.sum()) > 0 else None

    # -- projection (used by ProjectedOptimizer) ---------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """Every parameter whose update the projection touches (weights of protected modules, and biases or
        norm weights when frozen), each once."""
        out, seen = [], set()
        for e in self._entries:
            for _, p, _ in self._weights(e):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        for _, p in self._frozen:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def has_observed(self) -> bool:
        """True once any capability forward was observed (bases computed, or moments waiting for ``update()``)."""
        if self.updates > 0:
            return True
        if any(g.acc["capability"] is not None for g in self._groups):
            return True
        return any(e.kind == "embedding" and e.counts["capability"] is not None for e in self._entries)

    def check_protects(self, params: Iterable[torch.Tensor], *, where: str) -> None:
        """Raise ``ValueError`` unless every weight this subspace projects is one of ``params`` (the parameters
        a trainer or optimizer updates) and trainable, naming the modules that are not.

        Catches the setups that would otherwise run with no protection and no word: a subspace built on another
        model object than the one being trained, one built before ``get_peft_model`` (its modules are now frozen
        base layers, the adapters unprotected), an optimizer over parameters the subspace does not cover.
        """
        trained = {id(p) for p in params}
        missing: list[str] = []
        frozen: list[str] = []
        for e in self._entries:
            for label, p, _ in self._weights(e):
                if id(p) not in trained:
                    missing.append(label)
                elif not p.requires_grad:
                    frozen.append(label)
        if not missing and not frozen:
            return
        bad = missing or frozen
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        n_all = sum(len(self._weights(e)) for e in self._entries)
        if missing:
            why = (f"{len(missing)} of the {n_all} weights this ActivationSubspace protects are not parameters "
                   f"{where} updates ({shown})")
        else:
            why = f"{len(frozen)} of the {n_all} weights this ActivationSubspace protects are frozen ({shown})"
        lora_now = [n for n, m in self.model.named_modules() if _lora_kind(m) is not None] if self.model else []
        hint = ("it was built on another model object, or before get_peft_model() (its modules are now frozen "
                "base layers and the adapters are unprotected). Build it on the model being trained, after "
                "get_peft_model()" + (" (that model has LoRA layers; this subspace protects none)"
                                      if lora_now and not any(e.kind == "lora" for e in self._entries) else "")
                + ", or pass modules= to protect only trained modules")
        raise ValueError(f"{why}: {hint}")

    def project_updates_(self, params: list[torch.Tensor], deltas: list[torch.Tensor], *,
                         backend: str | None = None) -> ActivationStats:
        """Project the updates ``deltas[i]`` (same shapes as ``params[i]``, detached) in place.

        ``params`` must be a subset of :meth:`parameters` (others are ignored and left unchanged).
        Returns the step's :class:`ActivationStats`. Everything that can fail (sharded layouts, the op's
        checks) is checked before any delta is written, so on an error ``deltas`` are unchanged.
        """
        from ..ops import remove_span_

        zero_rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # written only after the op succeeded
        zero_all: list[torch.Tensor] = []
        where = {id(p): i for i, p in enumerate(params)}
        targets: list[torch.Tensor] = []
        bases: list[torch.Tensor | None] = []
        names: list[str] = []
        row_parts: list[torch.Tensor] = []
        row_names: list[str] = []
        for e in self._entries:
            for label, p, role in self._weights(e):
                i = where.get(id(p))
                if i is None:
                    continue
                d = local(deltas[i])
                if role == "rows":
                    if e.tokens is None or e.tokens.numel() == 0:
                        continue
                    if is_dtensor(params[i]) or is_dtensor(deltas[i]):
                        raise NotImplementedError(f"{label}: sharded (DTensor) embeddings are not supported")
                    rows = d.index_select(0, e.tokens)
                    row_parts.append(torch.stack([_sq(d), _sq(rows)]))
                    row_names.append(label)
                    zero_rows.append((d, e.tokens))
                    continue
                if role == "dense_t":
                    if is_dtensor(params[i]) or is_dtensor(deltas[i]):
                        raise NotImplementedError(f"{label}: a sharded Conv1D weight ([d_in, d_out] rows) cannot "
                                                  f"be projected locally")
                    d = d.t()
                if role.startswith("lora_b:"):
                    basis = e.lora_b_bases.get(role[7:])
                else:
                    basis = e.group.basis
                if basis is not None and basis.device != d.device:
                    basis = basis.to(d.device)
                    if role.startswith("lora_b:"):
                        e.lora_b_bases[role[7:]] = basis
                    else:
                        e.group.basis = basis
                targets.append(d)
                bases.append(basis if basis is not None and basis.shape[1] > 0 else None)
                names.append(label)
        for label, p in self._frozen:
            i = where.get(id(p))
            if i is None:
                continue
            d = local(deltas[i])
            row_parts.append(torch.stack([_sq(d), _sq(d)]))
            row_names.append(label)
            zero_all.append(d)
        dev = deltas[0].device if deltas else torch.device("cpu")
        if targets:
            per = remove_span_(targets, bases, backend=backend)
        else:
            per = torch.zeros((0, 2), dtype=torch.float64, device=dev)
        for d, tokens in zero_rows:
            d.index_fill_(0, tokens, 0)
        for d in zero_all:
            d.zero_()
        n_checked = per.shape[0] + len(row_parts) - len(zero_all)  # frozen biases/norms are zeroed on purpose
        if row_parts:
            per = torch.cat([per, torch.stack(row_parts).to(per.device)])
        if self._saturation_checks > 0 and not self._warned_saturated:
            self._saturation_checks -= 1  # a host sync: only on the first steps after each update()
            self._warn_if_saturated(names + row_names, per[:n_checked])
        tot = per.sum(0) if per.numel() else torch.zeros(2, dtype=torch.float64, device=dev)
        frac = torch.where(tot[0] > 0, (tot[1] / tot[0].clamp_min(1e-300)).sqrt(), tot.new_zeros(()))
        return ActivationStats(ranks=self.ranks(), names=names + row_names, per_target=per,
                               update_removed_fraction=frac)

    def _warn_if_saturated(self, names: list[str], per: torch.Tensor) -> None:
        """Warn (once) when the projection removed >= 99.9 % of the update of every protected parameter that
        had one: the run is then not training, only paying for it."""
        if per.numel() == 0:
            return
        rows = per.detach().cpu().tolist()
        moved = [(n, b, r) for n, (b, r) in zip(names, rows) if b > 0]
        if not moved or any(r < SATURATED_FRACTION ** 2 * b for _, b, r in moved):
            return
        self._warned_saturated = True
        shown = ", ".join(n for n, _, _ in moved[:6]) + (f" and {len(moved) - 6} more" if len(moved) > 6 else "")
        lora_both = self.lora == "both" and any(e.kind == "lora" for e in self._entries)
        advice = ("with LoRA use lora='input' (the default): B's input A x is only r-dimensional, so its basis "
                  "covers all of it and B never moves" if lora_both else
                  "lower energy (or set max_rank), protect fewer modules (modules=), or check that the capability "
                  "data is not the training data itself")
        warnings.warn(
            f"ActivationSubspace: this step's projection removed >= {SATURATED_FRACTION:.1%} of the update of every "
            f"protected parameter ({shown}): the model is barely training. {advice}. (Warned once.)",
            UserWarning, stacklevel=4)

    # -- reporting and state -----------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        """Per protected module name: its basis rank (protected tokens for embeddings). A LoRA layer ``name``
        has ``name`` (the input basis A is kept off) and ``name.lora_B`` (the basis of B's input ``A x`` its
        update is projected off: 0 with ``lora="input"``, where B needs none; the largest over adapters)."""
        out: dict[str, int] = {}
        for e in self._entries:
            if e.kind == "embedding":
                out[e.name] = 0 if e.tokens is None else int(e.tokens.numel())
            else:
                out[e.name] = 0 if e.group.basis is None else int(e.group.basis.shape[1])
            if e.kind == "lora":
                out[e.name + ".lora_B"] = max((int(u.shape[1]) for u in e.lora_b_bases.values()), default=0)
        return out

    def coverage(self) -> dict[str, float]:
        """How well the current bases still fit: per distinct input (keyed by its first module's name), the
        fraction ``tr(U^T C U) / tr(C)`` of the capability second moment observed since the last ``update()``
        that the current basis holds.

        Observe the capability data again with the model as it is now, call ``coverage()`` *before*
        ``update()``: values close to ``energy`` mean the bases have not moved and refreshing would change
        little (refresh less often); values well below mean the inputs drifted out of the protected span.
        Inputs with nothing observed or no basis are left out.
        """
        out: dict[str, float] = {}
        for g in self._groups:
            c = g.acc["capability"]
            if c is None or g.basis is None:
                continue
            tr = float(c.diagonal().sum())
            if not tr > 0:
                continue
            u = g.basis.to(c.device, c.dtype)
            out[g.members[0]] = float(((c @ u) * u).sum()) / tr
        return out

    def groups(self) -> list[list[str]]:
        """The module names sharing each distinct input (found at run time by ``observe``)."""
        return [list(g.members) for g in self._groups]

    def memory_bytes(self) -> int:
        """Bytes the persistent bases occupy: ``sum d_in * r * itemsize`` over distinct inputs (and LoRA B
        bases), plus 8 bytes per protected token."""
        n = 0
        for g in self._groups:
            if g.basis is not None:
                n += g.basis.numel() * g.basis.element_size()
        for e in self._entries:
            for u in e.lora_b_bases.values():
                n += u.numel() * u.element_size()
            if e.kind == "embedding" and e.tokens is not None:
                n += e.tokens.numel() * e.tokens.element_size()
        return n

    def state_dict(self) -> dict[str, Any]:
        """Settings, groups, bases, protected tokens, (with ``update(decay>0)``) the averaged moments, and the
        moments observed since the last ``update()`` (per side, with their counts: e.g. the training batches
        observed as the safety side between refreshes), so a resumed run's next ``update()`` is the same."""
        return {
            "version": 2,
            "settings": {"energy": self.energy, "contrast": self.contrast, "max_rank": self.max_rank,
                         "basis_dtype": str(self.basis_dtype).replace("torch.", ""), "biases": self.biases,
                         "norms": self.norms, "lora": self.lora, "weighting": self.weighting},
            "updates": self.updates,
            "groups": [{"modules": list(g.members), "d_in": g.d_in,
                        "basis": None if g.basis is None else g.basis.detach().cpu().clone(),
                        "ema": {s: (None if g.ema[s] is None else g.ema[s].cpu().clone()) for s in SIDES},
                        "acc": {s: (None if g.acc[s] is None else g.acc[s].detach().cpu().clone()) for s in SIDES},
                        "count": {s: float(g.count[s]) for s in SIDES}}
                       for g in self._groups],
            "lora_b": {e.name: {a: u.cpu().clone() for a, u in e.lora_b_bases.items()}
                       for e in self._entries if e.lora_b_bases},
            "tokens": {e.name: (None if e.tokens is None else e.tokens.cpu().clone())
                       for e in self._entries if e.kind == "embedding"},
            "token_ema": {e.name: {s: (None if e.ema_counts[s] is None else e.ema_counts[s].cpu().clone())
                                   for s in SIDES} for e in self._entries if e.kind == "embedding"},
            "token_counts": {e.name: {s: (None if e.counts[s] is None else e.counts[s].cpu().clone())
                                      for s in SIDES} for e in self._entries if e.kind == "embedding"},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output onto the same model structure (checked before anything changes)."""
        if not isinstance(state, dict) or state.get("version") not in (1, 2) or "groups" not in state:
            raise ValueError("state was not produced by ActivationSubspace.state_dict() (version 1 or 2)")
        by_name = {e.name: e for e in self._entries}
        dense = {e.name for e in self._entries if e.kind != "embedding"}
        listed: list[str] = []
        for j, gs in enumerate(state["groups"]):
            for n in gs["modules"]:
                if n not in dense:
                    raise ValueError(f"state groups[{j}] names module {n!r}, which this ActivationSubspace does "
                                     f"not protect")
                if by_name[n].d_in != gs["d_in"]:
                    raise ValueError(f"state groups[{j}]: module {n!r} has d_in {by_name[n].d_in}, state "
                                     f"{gs['d_in']}")
            b = gs["basis"]
            if b is not None and (b.dim() != 2 or b.shape[0] != gs["d_in"]):
                raise ValueError(f"state groups[{j}] basis has shape {tuple(b.shape)}; expected [{gs['d_in']}, r]")
            for side, a in (gs.get("acc") or {}).items():   # version 2: moments since the last update()
                if side not in SIDES or (a is not None and tuple(a.shape) != (gs["d_in"], gs["d_in"])):
                    raise ValueError(f"state groups[{j}] acc[{side!r}] has shape "
                                     f"{None if a is None else tuple(a.shape)}; expected [{gs['d_in']}, {gs['d_in']}]")
            listed += gs["modules"]
        if sorted(listed) != sorted(dense):
            raise ValueError(f"state covers modules {sorted(listed)}, this ActivationSubspace protects "
                             f"{sorted(dense)}")
        for n in set(state.get("tokens", {})) | set(state.get("token_counts", {})):
            if n not in by_name or by_name[n].kind != "embedding":
                raise ValueError(f"state names embedding {n!r}, which this ActivationSubspace does not protect")
        for n, cs in state.get("token_counts", {}).items():
            for side, c in cs.items():
                if side not in SIDES or (c is not None and tuple(c.shape) != (by_name[n].d_in,)):
                    raise ValueError(f"state token_counts[{n!r}][{side!r}] has shape "
                                     f"{None if c is None else tuple(c.shape)}; expected [{by_name[n].d_in}]")
        s = state["settings"]
        self.energy, self.contrast, self.max_rank = s["energy"], s["contrast"], s["max_rank"]
        self.basis_dtype = getattr(torch, s["basis_dtype"])
        # states saved before these settings existed were made with the rules of that time
        self.lora, self.weighting = s.get("lora", "both"), s.get("weighting", "energy")
        self.updates = int(state.get("updates", 0))
        self._groups = []
        for gs in state["groups"]:
            first = by_name[gs["modules"][0]]
            g = _Group(gs["d_in"], self._weights(first)[0][1].device)
            g.members = list(gs["modules"])
            g.pending = {n: 0 for n in g.members}
            g.n_accum = 1 if len(g.members) > 1 else 0
            g.basis = None if gs["basis"] is None else gs["basis"].to(g.device, self.basis_dtype)
            g.ema = {k: (None if v is None else v.to(g.device)) for k, v in gs.get("ema", {}).items()} or \
                {k: None for k in SIDES}
            # version 1 states hold no in-progress moments: the next update() sees only what comes after
            acc = gs.get("acc") or {}
            g.acc = {k: (None if acc.get(k) is None else acc[k].to(g.device, torch.float64)) for k in SIDES}
            g.count = {k: float((gs.get("count") or {}).get(k, 0.0)) for k in SIDES}
            for n in g.members:
                by_name[n].group = g
            self._groups.append(g)
        for e in self._entries:
            if e.kind == "lora":
                e.lora_b_bases = {a: u.to(e.group.device, self.basis_dtype)
                                  for a, u in state.get("lora_b", {}).get(e.name, {}).items()}
            if e.kind == "embedding":
                t = state.get("tokens", {}).get(e.name)
                e.tokens = None if t is None else t.to(e.module.weight.device)
                ema = state.get("token_ema", {}).get(e.name, {})
                e.ema_counts = {k: (None if ema.get(k) is None else ema[k].to(e.module.weight.device)) for k in SIDES}
                cnt = state.get("token_counts", {}).get(e.name, {})
                e.counts = {k: (None if cnt.get(k) is None else cnt[k].to(e.module.weight.device, torch.float64))
                            for k in SIDES}

    # -- loaders -----------------------------------------------------------------------------------
    def observe_loader(self, loader: Iterable[Any], *, side: str = "capability",
                       forward: Callable[[nn.Module, Any], Any] | None = None,
                       max_batches: int | None = None, positions: str | None = None) -> int:
        """Observe every batch of ``loader`` (no grad, model in eval mode) and return the number of batches.

        A batch may be a dict (HF style: passed as keywords, ``labels`` dropped, its ``attention_mask``
        excludes padding), a tensor (passed as the model's input) or a tuple/list (its first element is the
        input). ``forward(model, batch)`` overrides this.

        ``positions``: ``"all"`` (default: every unpadded position), ``"answer"`` (positions whose ``labels``
        are not -100: the bases protect what the model computes while answering) or ``"prompt"`` (the
        others). Needs dict batches with ``labels``. Default: the one given to :meth:`from_loader`, else all.
        """
        positions = positions or getattr(self, "positions", None) or "all"
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        n = 0
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        was_training = self.model.training
        self.model.eval()  # capability inputs as inference sees them: no dropout noise widening the span
        with torch.no_grad():
            for batch in (loader if max_batches is None else itertools.islice(loader, max_batches)):
                mask = _positions_mask(batch, positions, n)
                with self.observe(side=side, attention_mask=mask):
                    if forward is not None:
                        forward(self.model, batch)
                    else:
                        _default_forward(self.model, batch, device)
                n += 1
        self.model.train(was_training)
        return n

    def refresh(self, decay: float = 0.0) -> None:
        """Observe the loader given to :meth:`from_loader` again (from the current model) and update."""
        if self.loader is None:
            raise RuntimeError("refresh() needs the loader of ActivationSubspace.from_loader()")
        n = self.observe_loader(self.loader, forward=self.forward_fn, max_batches=self.max_batches)
        if n == 0:
            raise RuntimeError("refresh(): the loader yielded no batch (an exhausted iterator?); the bases were "
                               "left as they were")
        self.update(decay)

    @classmethod
    def from_loader(cls, model: nn.Module, loader: Iterable[Any], *, forward: Callable[[nn.Module, Any], Any] | None = None,
                    max_batches: int | None = None, positions: str = "all", **kwargs: Any) -> "ActivationSubspace":
        """An ``ActivationSubspace(model, **kwargs)`` that has observed every batch of ``loader`` and updated.

        The loader is kept (``refresh()``, ``attach(refresh_every=N)`` re-observe it from the current model),
        and so is ``positions`` (see :meth:`observe_loader`).
        """
        from .._batches import check_first  # the first batch has the model's inputs (peeked, nothing consumed)
        check_first(model, loader, where="ActivationSubspace.from_loader: the capability loader",
                    needs_loss=False, custom=forward is not None)
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if iter(loader) is loader:
            raise TypeError("from_loader: loader is a one-shot iterator (a generator?); refresh() must be able to "
                            "observe it again: pass a re-iterable (a list, a DataLoader)")
        sub = cls(model, **kwargs)
        sub.loader, sub.forward_fn, sub.max_batches, sub.positions = loader, forward, max_batches, positions
        n = sub.observe_loader(loader, forward=forward, max_batches=max_batches)
        if n == 0:
            raise ValueError("from_loader: the loader yielded no batch")
        sub.update()
        return sub

    def __repr__(self) -> str:
        r = list(self.ranks().values())
        return (f"ActivationSubspace(modules={len(self._entries)}, inputs={len(self._groups)}, energy={self.energy}, "
                f"contrast={self.contrast}, rank_mean={sum(r) / max(1, len(r)):.1f}, bytes={self.memory_bytes()})")


# -- helpers ----------------------------------------------------------------------------------------
def _broadcast_to_mask(lead: torch.Size | tuple, mask_shape: torch.Size | tuple) -> tuple[int, ...] | None:
    """``mask_shape`` when inputs with leading dims ``lead`` broadcast to it (equal, or 1 where the mask is
    larger, as position ids [1, S] do against a [B, S] mask), else None."""
    lead, mask_shape = tuple(lead), tuple(mask_shape)
    if len(lead) != len(mask_shape):
        return None
    if all(a == b or a == 1 for a, b in zip(lead, mask_shape)):
        return mask_shape
    return None


def _positions_mask(batch: Any, positions: str, index: int) -> torch.Tensor | None:
    """The observe() mask of a loader batch: its attention mask, narrowed to answer or prompt positions."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if positions == "all":
        return mask
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not isinstance(labels, torch.Tensor):
        keys = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"positions={positions!r} needs dict batches with 'labels' (-100 on prompt positions); "
                         f"batch {index} of the loader has {keys}")
    answer = labels != -100
    valid = mask.to(answer.device) != 0 if isinstance(mask, torch.Tensor) else torch.ones_like(answer)
    return (valid & answer) if positions == "answer" else (valid & ~answer)


def _default_forward(model: nn.Module, batch: Any, device: torch.device) -> Any:
    def mv(t: Any) -> Any:
        return t.to(device) if isinstance(t, torch.Tensor) else t

    if isinstance(batch, dict):
        return model(**{k: mv(v) for k, v in batch.items() if k != "labels"})
    if isinstance(batch, torch.Tensor):
        return model(mv(batch))
    if isinstance(batch, (list, tuple)) and batch:
        return model(mv(batch[0]))
    raise TypeError(f"cannot feed a batch of type {type(batch).__name__} to the model; pass forward=")


def _check_energy(energy: Any) -> float:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not math.isfinite(energy) \
            or not 0.0 <= energy <= 1.0:
        raise ValueError(f"energy must be a number in [0, 1], got {energy!r}")
    return float(energy)


def _check_contrast(contrast: Any) -> float:
    if isinstance(contrast, bool) or not isinstance(contrast, (int, float)) or not math.isfinite(contrast) \
            or contrast < 0:
        raise ValueError(f"contrast must be a finite number >= 0, got {contrast!r}")
    return float(contrast)


def _check_max_rank(max_rank: Any) -> int | None:
    if max_rank is None:
        return None
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be None or an int >= 1, got {max_rank!r}")
    return max_rank


def _select_rank(w: torch.Tensor, energy: float, max_rank: int | None, floor: float = 1e-12) -> int:
    """Fewest leading (descending) eigenvalues holding ``energy`` of the positive part. Eigenvalues below
    ``floor`` (1e-12 for float64 products, 1e-6 for float32) of the largest are round-off of a
    rank-deficient moment and never count."""
    if w.numel() == 0 or energy == 0:
        return 0
    top = float(w[0])
    if not top > 0:
        return 0
    pos = torch.where(w > top * floor, w, torch.zeros_like(w))
    n_pos = int((pos > 0).sum())
    c = torch.cumsum(pos, 0)
    k = int((c < energy * float(c[-1]) * (1 - 1e-12)).sum()) + 1
    k = min(k, n_pos)
    if max_rank is not None:
        k = min(k, max_rank)
    return k


def _subspace_iteration(m: torch.Tensor, energy: float, max_rank: int | None, prev: torch.Tensor | None,
                        *, tol: float = 1e-7, max_iters: int = 100) -> torch.Tensor:
    """Top eigenvectors of the PSD ``m`` holding ``energy`` of its trace: block subspace iteration with
    Rayleigh-Ritz (one ``m @ Q`` per iteration), warm-started from ``prev``; the block (>= 2 r + 16 columns,
    so the kept vectors converge at rate lambda_b / lambda_r) grows until it holds the energy, and falls back
    to a full eigh once it would reach half of d. Converged when the kept Ritz pairs' residual
    ``|m q - w q|`` is below ``tol`` of the largest eigenvalue (the span's error is that over the gap)."""
    d = m.shape[0]
    trace = float(m.diagonal().sum())
    if not trace > 0:
        return m.new_zeros((d, 0))

    def full() -> torch.Tensor:
        w, v = torch.linalg.eigh(m)
        w, v = w.flip(0), v.flip(1)
        return v[:, :_select_rank(w, energy, max_rank)].contiguous()

    gen = torch.Generator(device=m.device).manual_seed(d)  # the same start on every rank
    r0 = 0 if prev is None else prev.shape[1]
    b = max(64, 2 * r0 + 16)
    if 2 * b >= d:
        return full()
    q = torch.randn(d, b, generator=gen, dtype=m.dtype, device=m.device)
    if r0:
        q[:, :r0] = prev.to(m.dtype)
    q = torch.linalg.qr(q)[0]
    while True:
        k, last_k, kept, last_kept, held, last_held = 0, -1, 0.0, -1.0, 0.0, -1.0
        for _ in range(max_iters):
            z = m @ q
            t = q.t() @ z
            w, v = torch.linalg.eigh((t + t.t()) * 0.5)
            w, v = w.flip(0), v.flip(1)
            q, z = q @ v, z @ v
            top = float(w[0])
            if not top > 0:
                return m.new_zeros((d, 0))
            held = float(torch.where(w > top * 1e-12, w, torch.zeros_like(w)).sum())
            # energy against the exact trace: what the block misses counts as one more (last) eigenvalue
            k = min(b, _select_rank(torch.cat([w, w.new_tensor([max(trace - held, 0.0)])]), energy, max_rank))
            if k == 0:
                return m.new_zeros((d, 0))
            kept = float(w[:k].sum())  # exactly the energy q[:, :k] holds (Rayleigh quotients)
            if k < b and k == last_k:
                res = float(torch.linalg.norm(z[:, :k] - q[:, :k] * w[:k])) / math.sqrt(k)
                # converged vectors, or a kept energy that no longer moves (a flat spectrum at the cut,
                # where which of the near-equal directions is kept does not matter)
                if res <= tol * top or abs(kept - last_kept) <= 1e-9 * trace:
                    break
            if 2 * k + 16 > b and last_held >= 0 and held - last_held <= 1e-4 * trace:
                break  # the block is too small for the rank it needs to converge fast: grow it
            last_k, last_kept, last_held = k, kept, held
            q = torch.linalg.qr(z)[0]
        if 2 * k + 16 <= b or (max_rank is not None and k >= max_rank and k < b):
            return q[:, :k].contiguous()
        grow = max(2 * b, 2 * k + 16)
        if 4 * grow >= d:
            return full()  # a rank this large relative to d: the full eigh is cheaper
        extra = torch.randn(d, grow - b, generator=gen, dtype=m.dtype, device=m.device)
        q = torch.linalg.qr(torch.cat([q, extra], 1))[0]
        b = grow


def _sq(t: torch.Tensor) -> torch.Tensor:
    return torch.sum(t.to(torch.float64) ** 2) if t.numel() else torch.zeros((), dtype=torch.float64,
                                                                             device=t.device)
