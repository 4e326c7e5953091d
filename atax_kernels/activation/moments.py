"""Observing the capability (and safety) data: forward pre-hooks on the protected modules stream each distinct
input's second moment ``sum x x^T`` (rows at unmasked positions, weighted by token or by energy) or, for
embeddings, token counts; a forward is folded in only if all of it is finite. ``update()`` reads them
normalised (:func:`normalised_moments`) after summing them over the data-parallel group (``_all_reduce``)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .discovery import check_pending, input_key, joins_counted_input, record_reader
from .eigen import ROUND_OFF
from .inputs import DistinctInput, ProtectedModule
from .settings import SIDES

__all__ = ["ObserveMixin", "normalised_moments", "module_input", "select_rows", "broadcast_to_mask"]


class ObserveMixin:
    """``observe()`` and its hooks, and the all-reduce of what was observed (part of ``ActivationSubspace``)."""

    @contextlib.contextmanager
    def observe(self, side: str = "capability",
                attention_mask: torch.Tensor | None = None) -> Iterator["ActivationSubspace"]:  # noqa: F821
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
            check_pending(self._groups)
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
            check_pending(self._groups)
            self._commit()
            self._seen = {}

    def _hook_dense(self, e: ProtectedModule, args: tuple, kwargs: dict) -> None:
        orig = module_input(args, kwargs)
        x = orig.detach()
        key = input_key(x)
        if joins_counted_input(self._seen, self._groups, e, key):
            return
        g = e.group
        rows = select_rows(x, e.d_in, e.name, self._mask)
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
        record_reader(self._seen, e, key, orig)
        self._staged = True

    def _hook_rows(self, e: ProtectedModule, args: tuple, kwargs: dict) -> None:
        ids = module_input(args, kwargs)
        if ids.dtype.is_floating_point:
            raise TypeError(f"{e.name}: nn.Embedding input must be integer token ids, got {ids.dtype}")
        m = self._mask
        if m is not None:
            lead = broadcast_to_mask(ids.shape, m.shape)
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
            self._discard_staged()
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


def module_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor a protected module was called with (its first positional tensor, else a keyword one)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise RuntimeError("a protected module was called without a tensor input")


def select_rows(x: torch.Tensor, d: int, name: str, m: torch.Tensor | None) -> torch.Tensor:
    """Rows [n, d] of x at the positions where the mask ``m`` is set (all rows without one)."""
    if x.shape[-1] != d:
        raise ValueError(f"{name}: input has last dimension {x.shape[-1]}, expected d_in = {d}")
    if m is None:
        return x.reshape(-1, d)
    lead = broadcast_to_mask(x.shape[:-1], m.shape)
    if lead is not None:
        return x.expand(*lead, d)[m.to(x.device)]
    if x.reshape(-1, d).shape[0] == m.numel():
        return x.reshape(-1, d)[m.reshape(-1).to(x.device)]
    raise ValueError(f"{name}: input of shape {tuple(x.shape)} does not match attention_mask {tuple(m.shape)}")


def broadcast_to_mask(lead: torch.Size | tuple, mask_shape: torch.Size | tuple) -> tuple[int, ...] | None:
    """``mask_shape`` when inputs with leading dims ``lead`` broadcast to it (equal, or 1 where the mask is
    larger, as position ids [1, S] do against a [B, S] mask), else None."""
    lead, mask_shape = tuple(lead), tuple(mask_shape)
    if len(lead) != len(mask_shape):
        return None
    if all(a == b or a == 1 for a, b in zip(lead, mask_shape)):
        return mask_shape
    return None


def normalised_moments(g: DistinctInput, decay: float) -> dict[str, torch.Tensor | None] | None:
    """Per side, the moment ``C / n`` observed since the last ``update()`` (with ``decay`` > 0 folded into
    the running average ``ema``, which is returned); None when nothing new was observed on any side."""
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
