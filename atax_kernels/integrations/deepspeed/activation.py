"""Activation-space projection inside a DeepSpeed ZeRO-1/2/3 engine, on each rank's own fp32 master partition.

ZeRO's optimizer step ends with its inner (torch) optimizer updating flat fp32 partitions: once per parameter
group under ZeRO-1/2 (``single_partition_of_fp32_groups[i]``), once per sub-group under ZeRO-3
(``fp32_partitioned_groups_flat[i]``); ZeRO then copies them into the 16-bit parameters and all-gathers those.
:class:`ActivationEngineHandle` wraps that inner ``step`` (an instance attribute, undone by ``detach()``): it
copies the protected fragments of the group's flat partition (the one snapshot: this rank's share of the
protected weights, fp32), lets the optimizer step, takes the realised update ``dW = new - old`` and writes back
``old + P(dW)``, so what ZeRO copies out and gathers is already projected, on every rank, with no extra gather.

Rows. A protected weight ``[d_out, d_in]`` is projected row by row (``dW <- dW - (dW U) U^T``, ``U`` its
input basis ``[d_in, k]``). A rank's fragment is a contiguous range ``[s, s + n)`` of the flattened weight: whole
rows, plus at most one partial row at each end where a partition boundary cuts a row. Whole rows are projected
locally (one batched ``remove_span_`` call); a cut row's ``k`` coefficients are the sum of the ranks' partial dots
(``dW_row[cols] @ U[cols]``), so each group call makes one float64 ``all_reduce`` of ``k`` numbers per cut row (at
most ``world - 1`` cut rows per weight) plus two per protected tensor for the statistics. No row and no weight is
gathered. The cut rows are fixed by the partition layout: every rank learns all of them once, at attach
(``all_gather_object`` of the fragments' positions).

Protected embeddings keep their protected token rows (zeroed in the update) and frozen biases and norm weights
their values, as in the single-process path. Refused: LoRA layers (``lora="input"`` edits ``lora_A`` itself at
each ``update()``, which would bypass the fp32 master), GPT-2 ``Conv1D`` weights (stored ``[d_in, d_out]``: a
projected column spans every rank's fragment).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...activation.discovery import projected_weights
from ...activation.stats import ActivationStats
from .checkpoint import loaded_tag
from .partitions import ZeroPartitions, extra_pass

__all__ = ["ActivationEngineHandle", "attach_activation", "refuse_entries"]

_VERSION = 1


@dataclass
class _Target:
    """One tensor the projection touches: a protected weight (``"dense"``), an embedding's token rows
    (``"rows"``) or a frozen bias / norm weight (``"frozen"``)."""
    label: str
    param: torch.nn.Parameter
    role: str
    entry: Any            # the subspace's ProtectedModule (None for frozen parameters)
    row_len: int          # elements per row of the flattened tensor (d_in for weights)
    group: int            # the ZeRO (sub-)group whose flat partition holds it


@dataclass
class _Fragment:
    """This rank's part of a target: ``flat[offset: offset + numel]`` holds the flattened tensor's elements
    ``[start, start + numel)``."""
    target: int
    flat: torch.Tensor
    offset: int
    numel: int
    start: int

    def view(self) -> torch.Tensor:
        return self.flat.detach().narrow(0, self.offset, self.numel)


def refuse_entries(subspace: Any, where: str = "under DeepSpeed ZeRO") -> None:
    """Raise for the protected modules activation space cannot serve on ZeRO partitions (LoRA, Conv1D)."""
    for e in subspace._entries:
        if e.kind == "lora":
            raise NotImplementedError(
                f"{e.name}: LoRA layers are not supported {where}: lora='input' edits lora_A in each update(), "
                f"which would bypass ZeRO's fp32 master copy; protect the base layers (modules=) or train LoRA "
                f"under DDP/FSDP2")
        if e.kind == "conv1d":
            raise NotImplementedError(
                f"{e.name}: a Conv1D weight (stored [d_in, d_out], GPT-2) cannot be projected {where}: each "
                f"projected column spans every rank's fragment; leave it out (modules=)")


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's real shape (ZeRO-3 leaves a placeholder and keeps it in ``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", None) or p.shape)


class ActivationEngineHandle:
    """What :func:`attach_activation` returns: projects each ZeRO step's realised update of the subspace's
    protected parameters off their bases. ``detach()`` undoes the patch.

    Attributes:
        subspace: the :class:`~atax_kernels.ActivationSubspace` (its bases must be the same on every rank:
            ``update()`` sums the moments over the data-parallel group, so refresh on every rank together).
        last_stats: :class:`~atax_kernels.ActivationStats` of the last step (global values, the same on every
            rank), or None (before the first step, or the last one was skipped by ZeRO's overflow check).
        steps: optimizer steps taken so far (skipped ones included).
        last_exchange_numel: float64 numbers all-reduced in the last step (cut-row coefficients and stats).
    """

    def __init__(self, engine: Any, subspace: Any, backend: str | None = None) -> None:
        from ...activation import ActivationSubspace

        if not isinstance(subspace, ActivationSubspace):
            raise TypeError(f"subspace must be an ActivationSubspace, got {type(subspace).__name__}")
        if engine.__dict__.get("_atax_handle") is not None:
            raise RuntimeError("this engine is already attached: call detach() on its handle first")
        self.engine, self.subspace, self.backend = engine, subspace, backend
        self.partitions = ZeroPartitions(engine, space="activation")
        self.opt = engine.optimizer
        self.inner = self.opt.optimizer
        self.targets = self._find_targets()
        self.rank = torch.distributed.get_rank(self.partitions.group)
        self.world = torch.distributed.get_world_size(self.partitions.group)
        self._cut_slots = self._exchange_cut_rows()
        self.last_stats: ActivationStats | None = None
        self.last_exchange_numel = 0
        self.steps = 0
        self._layout: list[_Fragment | None] | None = None
        self._key_of_flat: dict[int, int] = {}
        self._checked_updates = -1
        self._step_stats: torch.Tensor | None = None
        self._exchanged = 0
        self._saved = [obj.__dict__.get(attr) for obj, attr in self._patch_targets()]
        orig_inner, orig_step = self.inner.step, self.opt.step
        orig_save, orig_load = engine.save_checkpoint, engine.load_checkpoint
        self.inner.step = functools.wraps(orig_inner)(lambda *a, **k: self._inner_step(orig_inner, *a, **k))
        self.opt.step = functools.wraps(orig_step)(lambda *a, **k: self._step(orig_step, *a, **k))
        engine.save_checkpoint = functools.wraps(orig_save)(
            lambda save_dir, tag=None, *a, **k: self._save(orig_save, save_dir, tag, *a, **k))
        engine.load_checkpoint = functools.wraps(orig_load)(
            lambda load_dir, tag=None, *a, **k: self._load(orig_load, load_dir, tag, *a, **k))
        engine.__dict__["_atax_handle"] = self

    def refresh(self, forward: Callable[[], Any]) -> None:
        """Recompute the bases from one capability pass through the engine, on every rank together:
        :func:`atax_kernels.activation.apply.refresh` (``forward()`` observed, then ``update()``, which sums the
        moments over the data-parallel group), with ZeRO-3's module trace kept to the training passes
        (:func:`~.partitions.extra_pass`)."""
        from ...activation.apply import refresh

        with extra_pass(self.engine):
            refresh(self.subspace, forward)

    # --- layout -----------------------------------------------------------------------------------------

    def _patch_targets(self) -> list[tuple[Any, str]]:
        return [(self.inner, "step"), (self.opt, "step"), (self.engine, "save_checkpoint"),
                (self.engine, "load_checkpoint")]

    def _group_of(self) -> dict[int, int]:
        opt = self.opt
        groups = opt.fp16_groups if self.partitions.stage3 else opt.bit16_groups
        return {id(p): i for i, group in enumerate(groups) for p in group}

    def _find_targets(self) -> list[_Target]:
        sub = self.subspace
        group_of = self._group_of()
        managed = {id(p) for p in self.partitions.params}
        out: list[_Target] = []
        seen: set[tuple[int, str]] = set()
        refuse_entries(sub)
        for e in sub._entries:
            for label, p, role in projected_weights(e, sub.lora):
                if id(p) not in managed or (id(p), role) in seen:
                    continue
                seen.add((id(p), role))
                shape = _full_shape(p)
                out.append(_Target(label, p, role, e, int(shape[-1]) if len(shape) > 1 else 1, group_of[id(p)]))
        for label, p in sub._frozen:
            if id(p) in managed and (id(p), "frozen") not in seen:
                seen.add((id(p), "frozen"))
                out.append(_Target(label, p, "frozen", None, 1, group_of[id(p)]))
        return out

    def _fragments(self) -> list[_Fragment | None]:
        """This rank's fragment of each target (None where it owns none), read from ZeRO's current layout."""
        opt = self.opt
        out: list[_Fragment | None] = []
        for i, t in enumerate(self.targets):
            p = t.param
            if self.partitions.stage3:
                sub_group, offset, size = opt.grad_position[opt.get_param_id(p)]
                rank = opt._get_param_partition_rank(p)
                numel = max(0, min(size, p.ds_numel - rank * size))  # the last ranks' partitions end in padding
                frag = _Fragment(i, opt.fp32_partitioned_groups_flat[sub_group], offset, numel, rank * size)
            else:
                m = getattr(p, "_hp_mapping", None)
                if m is None:
                    out.append(None)
                    continue
                frag = _Fragment(i, opt.single_partition_of_fp32_groups[t.group], m.hp_fragment_address.start,
                                 m.hp_fragment_address.numel, m.lp_fragment_address.start)
            out.append(frag if frag.numel > 0 else None)
        return out

    def _exchange_cut_rows(self) -> list[dict[int, int]]:
        """Per target, ``{row: slot}`` for every row a partition boundary cuts (the same on every rank)."""
        mine = [(f.target, f.start) for f in self._fragments() if f is not None]
        everyone: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(everyone, mine, group=self.partitions.group)
        rows: list[set[int]] = [set() for _ in self.targets]
        for frags in everyone:
            for ti, start in frags:
                t = self.targets[ti]
                if t.role == "dense" and start % t.row_len:
                    rows[ti].add(start // t.row_len)
        return [{r: j for j, r in enumerate(sorted(s))} for s in rows]

    # --- the step ---------------------------------------------------------------------------------------

    def _comm_device(self) -> torch.device:
        """Where the exchange buffers live: NCCL needs CUDA tensors even when the fp32 partitions are offloaded
        to the CPU; gloo takes them where the partitions are."""
        if torch.distributed.get_backend(self.partitions.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return self.partitions.device

    def _basis(self, t: _Target, device: torch.device) -> torch.Tensor | None:
        basis = t.entry.group.basis
        if basis is None or basis.shape[1] == 0:
            return None
        if basis.device != device:
            basis = t.entry.group.basis = basis.to(device)
        return basis

    def _check_bases_agree(self, device: torch.device) -> None:
        """Once per ``update()``: every rank must hold bases of the same ranks (else the exchange would not
        line up); compared with one small all-reduce."""
        sub = self.subspace
        if sub.updates == self._checked_updates:
            return
        ranks = torch.tensor([0 if t.role != "dense" or (b := t.entry.group.basis) is None else b.shape[1]
                              for t in self.targets] + [sub.updates], dtype=torch.float64, device=device)
        both = torch.stack([ranks, -ranks])
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=self.partitions.group)
        if not (torch.equal(both[0], ranks) and torch.equal(-both[1], ranks)):
            raise RuntimeError("the ActivationSubspace bases differ between ranks (ranks or update() counts): call "
                               "update()/refresh on every rank together (it all-reduces the moments), or load the "
                               "same state_dict on every rank")
        self._checked_updates = sub.updates

    def _step(self, orig_step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._step_stats = None
        self._exchanged = 0
        self._layout = self._fragments()
        self._key_of_flat = ({id(f): i for i, f in enumerate(self.opt.fp32_partitioned_groups_flat)}
                             if self.partitions.stage3 else
                             {id(f): i for i, f in enumerate(self.opt.single_partition_of_fp32_groups)})
        self._check_bases_agree(self._comm_device())
        try:
            out = orig_step(*args, **kwargs)
        finally:
            self._layout = None
        # every optimizer step counts (the refresh schedule is in steps, as on one process); one ZeRO skipped
        # (fp16 overflow: the inner step never ran) has no stats
        self.steps += 1
        self.last_stats = None
        if self._step_stats is not None:
            per = self._step_stats
            tot = per.sum(0)
            frac = torch.where(tot[0] > 0, (tot[1] / tot[0].clamp_min(1e-300)).sqrt(), tot.new_zeros(()))
            self.last_stats = ActivationStats(ranks=self.subspace.ranks(), names=[t.label for t in self.targets],
                                              per_target=per, update_removed_fraction=frac)
            self.last_exchange_numel = self._exchanged
        return out

    def _inner_step(self, orig_inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        layout = self._layout
        if layout is None:  # the inner optimizer stepped outside ZeRO's step(): nothing to project
            return orig_inner(*args, **kwargs)
        keys = {self._key_of_flat.get(id(p)) for g in self.inner.param_groups for p in g["params"]}
        chosen = [i for i, t in enumerate(self.targets) if t.group in keys]
        if not chosen:
            return orig_inner(*args, **kwargs)
        frags = [layout[i] for i in chosen if layout[i] is not None]
        # one snapshot per parameter: a tied weight (an embedding's token rows and the lm_head's columns) is two
        # targets of one fragment, and its two edits (row zeroing, column projection) commute on one delta
        owners: list[_Fragment] = []
        seen: set[int] = set()
        for f in frags:
            if id(self.targets[f.target].param) not in seen:
                seen.add(id(self.targets[f.target].param))
                owners.append(f)
        deltas = [f.view().clone() for f in owners]
        out = orig_inner(*args, **kwargs)
        now = [f.view() for f in owners]
        if owners:
            torch._foreach_sub_(deltas, now)
            torch._foreach_neg_(deltas)       # realised update dW = new - old
            torch._foreach_sub_(now, deltas)  # back to old (exact where old and new are within 2x: Sterbenz)
        delta_of = {id(self.targets[f.target].param): d for f, d in zip(owners, deltas)}
        self._project(chosen, frags, [delta_of[id(self.targets[f.target].param)] for f in frags])
        if owners:
            torch._foreach_add_(now, deltas)  # old + projected dW
        return out

    def _project(self, chosen: list[int], frags: list[_Fragment], deltas: list[torch.Tensor]) -> None:
        from ...ops import remove_span_

        local = self.partitions.device   # where the fragments (and so the bases used on them) live
        comm = self._comm_device()       # where the exchange buffer lives
        # the exchange buffer: the cut rows' coefficients of the chosen targets, then [before, removed] per target
        slot_base: dict[int, int] = {}
        width: dict[int, int] = {}
        size = 0
        for ti in chosen:
            t = self.targets[ti]
            u = self._basis(t, local) if t.role == "dense" else None
            width[ti] = 0 if u is None else u.shape[1]
            slot_base[ti] = size
            size += width[ti] * len(self._cut_slots[ti])
        stats_at = size
        n_stats = 2 * len(chosen)
        stat_row = {ti: 2 * j for j, ti in enumerate(chosen)}
        stats_local = torch.zeros(n_stats, dtype=torch.float64, device=local)
        coefs_local = torch.zeros(size, dtype=torch.float64, device=local)
        full_targets, full_bases, full_owner = [], [], []
        partials = []  # (target, segment, first column, coefficient offset)
        # zeroing waits until the column projection is done: a tied weight's two edits commute, and the stats
        # are then those of the single-process path (each edit measured on the unedited update)
        zero_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        zero_all: list[torch.Tensor] = []
        for f, d in zip(frags, deltas):
            t = self.targets[f.target]
            at = stat_row[f.target]
            if t.role == "frozen":
                stats_local[at] += torch.sum(d.double() ** 2)
                stats_local[at + 1] += torch.sum(d.double() ** 2)
                zero_all.append(d)
                continue
            if t.role == "rows":
                tokens = t.entry.tokens
                if tokens is None or tokens.numel() == 0:
                    continue  # nothing protected: not counted (as on one process)
                stats_local[at] += torch.sum(d.double() ** 2)
                row = torch.arange(f.start, f.start + f.numel, device=d.device) // t.row_len
                hit = torch.isin(row, tokens.to(d.device))
                stats_local[at + 1] += torch.sum(d[hit].double() ** 2)
                zero_rows.append((d, hit))
                continue
            stats_local[at] += torch.sum(d.double() ** 2)
            k = width[f.target]
            if k == 0:
                continue
            u = self._basis(t, local)
            c = t.row_len
            head = min((-f.start) % c, f.numel)
            whole = (f.numel - head) // c
            tail = f.numel - head - whole * c
            if head:
                slot = self._cut_slots[f.target][f.start // c]
                partials.append((f.target, d[:head], f.start % c, slot_base[f.target] + slot * k))
            if whole:
                full_targets.append(d[head: head + whole * c].view(whole, c))
                full_bases.append(u)
                full_owner.append(f.target)
            if tail:
                seg = d[head + whole * c:]
                slot = self._cut_slots[f.target][(f.start + f.numel) // c]
                partials.append((f.target, seg, 0, slot_base[f.target] + slot * k))
        for ti, seg, col, at in partials:
            u = self.targets[ti].entry.group.basis
            k = u.shape[1]
            coefs_local[at: at + k] += seg.double() @ u[col: col + seg.numel()].double()
        if full_targets:
            per = remove_span_(full_targets, full_bases, backend=self.backend)
            for ti, removed in zip(full_owner, per[:, 1].to(local)):
                stats_local[stat_row[ti] + 1] += removed
        buf = torch.cat([coefs_local, stats_local]).to(comm)
        torch.distributed.all_reduce(buf, group=self.partitions.group)
        self._exchanged += buf.numel()
        summed = buf.to(local)
        for ti, seg, col, at in partials:
            u = self.targets[ti].entry.group.basis
            coef = summed[at: at + u.shape[1]]
            seg.sub_((u[col: col + seg.numel()].double() @ coef).to(seg.dtype))
        for d, hit in zero_rows:
            d.masked_fill_(hit, 0)
        for d in zero_all:
            d.zero_()
        # each cut row's removed part is |coef|^2 (orthonormal basis), counted once, the same on every rank
        stats = summed[stats_at:].view(-1, 2).clone()
        for j, ti in enumerate(chosen):
            k = width[ti]
            if k and self._cut_slots[ti]:
                coefs = summed[slot_base[ti]: slot_base[ti] + k * len(self._cut_slots[ti])]
                stats[j, 1] += torch.sum(coefs ** 2)
        if self._step_stats is None:
            self._step_stats = torch.zeros((len(self.targets), 2), dtype=torch.float64, device=local)
        self._step_stats[torch.tensor(chosen, device=local)] += stats

    # --- checkpoints --------------------------------------------------------------------------------------

    def _state_path(self, directory: str, tag: str) -> str:
        return os.path.join(directory, str(tag), f"atax_activation_rank{self.rank:05d}.pt")

    def _save(self, orig: Callable[..., Any], save_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        tag = f"global_step{self.engine.global_steps}" if tag is None else str(tag)  # DeepSpeed's default tag
        out = orig(save_dir, tag, *args, **kwargs)
        path = self._state_path(save_dir, tag)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(dict(version=_VERSION, steps=self.steps, subspace=self.subspace.state_dict()), path)
        return out

    def _load(self, orig: Callable[..., Any], load_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        out = orig(load_dir, tag, *args, **kwargs)
        if isinstance(out, tuple) and out and out[0] is None:
            return out  # DeepSpeed found nothing to load
        if tag is None:  # the tag DeepSpeed resolved ("latest", or "latest_universal" for universal checkpoints)
            tag = loaded_tag(load_dir, out)
        path = self._state_path(load_dir, tag)
        if os.path.isfile(path):
            state = torch.load(path, map_location="cpu", weights_only=False)
            if state.get("version") != _VERSION:
                raise ValueError(f"{path}: unknown atax activation state version {state.get('version')}")
            self.subspace.load_state_dict(state["subspace"])
            self.steps = state["steps"]
            self._checked_updates = -1
        return out

    def detach(self) -> None:
        """Restore the patched methods; the handle stops projecting."""
        for (obj, attr), saved in zip(self._patch_targets(), self._saved):
            if saved is None:
                obj.__dict__.pop(attr, None)
            else:
                setattr(obj, attr, saved)
        self.engine.__dict__.pop("_atax_handle", None)


def attach_activation(engine: Any, subspace: Any, *, backend: str | None = None) -> ActivationEngineHandle:
    """Project every ZeRO optimizer step's realised update of ``subspace``'s protected weights off their
    capability input bases, on each rank's fp32 master partition (see the module docstring).

    One call after ``deepspeed.initialize``; refresh the bases as usual (every rank together)::

        sub = ActivationSubspace(model, energy=0.9)     # before or after deepspeed.initialize
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        handle = attach_activation(engine, sub)
        handle.refresh(lambda: engine(capability_batch))  # observe + update(), every rank together
        for batch in loader:
            engine.backward(safety_loss(engine, batch))
            engine.step()   # the update of each protected weight lands off its basis

    ``engine.save_checkpoint``/``load_checkpoint`` (patched) carry the subspace's state and the step count.
    ``offload_optimizer``/``offload_param`` with ``device="cpu"`` are served (the fp32 partition is read where it
    lives). Refused with a reason: LoRA layers, Conv1D weights, NVMe offload, and what :func:`check_supported`
    refuses for every space (pipeline/tensor/sequence parallelism, MoE, ...).
    """
    return ActivationEngineHandle(engine, subspace, backend)
