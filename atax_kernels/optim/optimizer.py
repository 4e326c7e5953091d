"""``ProjectedOptimizer``: wrap any torch optimizer so safety updates avoid capability directions.

The standard loop::

    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4))
    for cap_batch, safety_batch in loader:
        opt.zero_grad()
        capability_loss(model, cap_batch).backward()
        opt.capture_reference()          # live: .grad moves into the reference store, no copy
        safety_loss(model, safety_batch).backward()
        opt.step()                       # project_ the safety gradient, then the wrapped step

The wrapper shares ``param_groups``, ``state`` and ``defaults`` with the wrapped optimizer (live delegation:
frameworks that swap parameters after construction keep working), so LR schedulers, ``GradScaler``,
checkpointing and ``add_param_group`` work unchanged.

Distributed: under DDP the gradients are replicated and nothing changes. Under FSDP2/HSDP (``fully_shard``)
gradients, captured references, EMA buffers and parameters are DTensors: ``step()`` projects their local
shards with the Gram all-reduced over the shard mesh dimensions (as ``project_`` does), so every rank gets
the same coefficients, statistics and EMA fold decisions. ``step()`` is then a collective call. A
``Subspace`` over sharded parameters is refused (its orthonormalisation uses shard-local dots).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from .. import distributed as _dist
from .._dtensor import local
from .._gradstash import GradStash
from .._warn import user_stacklevel
from ..activation.apply import UpdateSnapshot, empty_stats, refresh
from ..activation.schedule import RefreshSchedule, refresh_if_due
from ..projection import ProjectionStats, project_resolved, unprojected_stats
from ..references.ema import capture_verdict, fold_ema_
from ..references.subspace import Subspace
from . import checkpoint
from .settings import check_activation_settings, check_settings


NO_REFERENCES = "no references"


class ProjectedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that projects gradients (or updates) against capability references.

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim.Optimizer``).
        mode: ``"orthogonal"`` or ``"conflict"`` (see :func:`atax_kernels.project_`).
        strength: alpha in [0, 1].
        granularity: ``"global"`` or ``"tensor"``.
        target: ``"grad"`` projects the gradient before the wrapped step; ``"update"`` projects the wrapped
            optimizer's parameter update (an adaptive optimizer's normalised step is not orthogonal to the
            references even when the gradient is). ``"update"`` costs one copy of the parameters that have
            gradients, held during the step.
        ptx_weight: lambda >= 0: adds ``lambda * mean(references)`` to the projected gradient (PTX mixing),
            in the same fused pass. Only with ``target="grad"``. PTX trades safety progress for capability
            kept: a larger lambda keeps more capability and learns safety more slowly. Prefer loss-objective
            references (PTX then mixes in a bounded objective); with margin references the combination was
            reported to hurt, which our runs did not reproduce, so measure it on held-out data.
        reference: ``"live"`` (captured gradients are used by the next step, then dropped) or ``"ema"``
            (captures are folded into persistent exponential moving averages, one per capture slot).
        ema_beta: EMA decay.
        reference_dtype: EMA buffer dtype (``torch.bfloat16`` halves its memory); default the gradient's.
        max_references: most captures per step.
        subspace: a :class:`Subspace` of persistent directions, used in addition to captured ones (or alone).
        reference_fn: callable returning a capability loss. When given, ``step()`` stashes the safety
            gradients (zero-copy), runs ``reference_fn().backward()``, captures, restores and projects, every
            ``refresh_every`` steps (reusing the EMA in between; with live references it refreshes every step).
            A drop-in for loops that only call ``optimizer.step()``.
        refresh_every: see ``reference_fn``. With ``activation_subspace`` and ``reference_fn`` it may also be a
            :class:`~atax_kernels.activation.RefreshSchedule` (e.g. ``RefreshSchedule(every=10, tol=0.02)``): at
            each of its checks ``reference_fn()`` is observed and the bases are rebuilt only if they no longer
            hold what it shows (``ActivationSubspace.update_if_drifted``), the interval doubling while they are
            kept; step 0 builds bases only if there are none. Its position is saved in ``state_dict()``.
        scaler: the ``GradScaler`` in use, if any. Captured gradients are scaled; the wrapper divides by the
            scale where magnitudes matter (EMA, PTX) and scales ``reference_fn``'s backward the same way.
        backend: kernel backend for ``project_`` (None: fastest available).
        activation_subspace: an :class:`~atax_kernels.ActivationSubspace`: after the wrapped step (and after any
            gradient-reference projection, whatever its ``target``), the realised update of every protected
            parameter (weight decay included) is projected off its capability input basis, and protected
            embedding rows keep their values. No capture is needed. With ``reference_fn``, every
            ``refresh_every`` steps ``reference_fn()`` runs under ``torch.no_grad()`` inside
            ``activation_subspace.observe()`` (its return value is ignored) and ``update()`` follows; the
            gradient references then come from ``capture_reference()`` only. Costs one copy of the protected
            parameters during the step. ``last_stats.activation`` holds the ranks and the fraction removed.
        activation_target: what the activation projection applies to. ``"update"`` (default without PTX): the
            realised update, after the wrapped step (exact: ``dW x = 0`` on the protected span, weight decay and
            momentum included). ``"grad"`` (default with ``ptx_weight > 0``): the gradient present at ``step()``
            (the safety gradient) is projected before the wrapped step and the captured references are then
            *added* as PTX (``lambda * mean``), not projected against; no copy of the parameters. This lets PTX
            act inside the protected span, where an update projection would remove it; the guarantee becomes
            first-order for adaptive optimizers (Adam's per-element scaling of a projected gradient is not
            exactly off the span) and decoupled weight decay is not projected.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        mode: str = "orthogonal",
        strength: float = 1.0,
        granularity: str = "global",
        target: str = "grad",
        ptx_weight: float = 0.0,
        reference: str = "live",
        ema_beta: float = 0.9,
        reference_dtype: torch.dtype | None = None,
        max_references: int = 8,
        subspace: Subspace | None = None,
        reference_fn: Callable[[], torch.Tensor] | None = None,
        refresh_every: int | RefreshSchedule = 1,
        scaler: Any = None,
        backend: str | None = None,
        activation_subspace: Any = None,
        activation_target: str | None = None,
    ) -> None:
        if isinstance(optimizer, ProjectedOptimizer):
            raise TypeError("optimizer is already a ProjectedOptimizer; wrap the inner optimizer once")
        strength = check_settings(optimizer, mode=mode, strength=strength, granularity=granularity, target=target,
                                  ptx_weight=ptx_weight, reference=reference, ema_beta=ema_beta,
                                  reference_dtype=reference_dtype, max_references=max_references, subspace=subspace,
                                  reference_fn=reference_fn, refresh_every=refresh_every, backend=backend)

        # Deliberately no Optimizer.__init__: param_groups/state/defaults live in the wrapped optimizer.
        self.optimizer = optimizer
        self.mode, self.strength, self.granularity, self.target = mode, strength, granularity, target
        self.ptx_weight = float(ptx_weight)
        self.reference, self.ema_beta, self.reference_dtype = reference, float(ema_beta), reference_dtype
        self.max_references, self.subspace = max_references, subspace
        self.reference_fn, self.refresh_every, self.scaler, self.backend = reference_fn, refresh_every, scaler, backend
        activation_target = check_activation_settings(
            optimizer, activation_subspace, activation_target, ptx_weight=ptx_weight, mode=mode, strength=strength,
            granularity=granularity, reference_fn=reference_fn, refresh_every=refresh_every)
        self.activation_subspace = activation_subspace
        self.activation_target = activation_target
        self._pending: list[tuple[list[torch.Tensor | None], float]] = []  # (tensors per param, inverse scale)
        self._ema: list[list[torch.Tensor | None]] = []
        self._ema_count: list[int] = []
        self._steps = 0
        self._warned_no_references = False
        self.last_stats: ProjectionStats | None = None
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        self._optimizer_state_dict_pre_hooks: dict = {}
        self._optimizer_state_dict_post_hooks: dict = {}
        self._optimizer_load_state_dict_pre_hooks: dict = {}
        self._optimizer_load_state_dict_post_hooks: dict = {}
        self._refuse_sharded_subspace(self._params())

    # -- live delegation ----------------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        sub = getattr(self, "activation_subspace", None)
        if sub is None:
            return (f"ProjectedOptimizer(mode={self.mode!r}, strength={self.strength}, target={self.target!r}, "
                    f"reference={self.reference!r}, optimizer={self.optimizer!r})")
        act = (f"activation: energy={sub.energy:g}, contrast={sub.contrast:g}, modules={len(sub._entries)}, "
               f"activation_target={self.activation_target!r}, refresh_every={self.refresh_every}")
        if self.ptx_weight > 0 and self.activation_target == "grad":
            refs = f"captured references added as PTX: ptx_weight={self.ptx_weight:g}"
        else:  # capture_reference() / subspace= directions, projected as without an activation subspace
            refs = (f"gradient references: mode={self.mode!r}, strength={self.strength}, target={self.target!r}, "
                    f"reference={self.reference!r}")
        return f"ProjectedOptimizer({act}; {refs}; optimizer={self.optimizer!r})"

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _first_device(self) -> torch.device:
        params = self._params()
        return params[0].device if params else torch.device("cpu")

    def _inv_scale(self) -> float:
        if self.scaler is None or not getattr(self.scaler, "is_enabled", lambda: True)():
            return 1.0
        return 1.0 / float(self.scaler.get_scale())

    # -- references ---------------------------------------------------------------------------------
    @property
    def num_references(self) -> int:
        """References the next step will project against (pending captures, EMA slots, subspace rank)."""
        slots = len(self._pending) if self.reference == "live" else max(len(self._ema), len(self._pending))
        return slots + (self.subspace.rank if self.subspace is not None else 0)

    def capture_reference(self) -> None:
        """Take the current ``.grad`` tensors as one capability reference direction.

        Live references: the gradient tensors themselves move into the store (``.grad`` becomes None), no
        copy, except gradients that are views of a shared buffer (DDP ``gradient_as_bucket_view``), which are
        cloned because the next backward would overwrite them. EMA references: the capture is held the same
        way and folded into its EMA slot by ``step()`` (so a step skipped by a GradScaler leaves the EMA as it
        was). Captures are per step: ``zero_grad()`` and ``step()`` clear unconsumed ones.
        """
        if len(self._pending) >= self.max_references:
            raise ValueError(
                f"max_references={self.max_references} captures already pending for this step; call step() "
                f"(or zero_grad()) first, or raise max_references"
            )
        params = self._params()
        taken: list[torch.Tensor | None] = []
        for i, p in enumerate(params):
            g = p.grad
            if g is None:
                taken.append(None)
                continue
            if g.is_sparse:
                raise TypeError(f"parameter {i} has a sparse gradient; sparse gradients are not supported")
            taken.append(g.detach().clone() if g._base is not None else g.detach())
            p.grad = None
        if all(t is None for t in taken):
            raise ValueError("capture_reference(): no parameter has a gradient; run the capability backward first")
        self._pending.append((taken, self._inv_scale()))

    def clear_references(self) -> None:
        """Drop pending captures (EMA buffers and the subspace persist)."""
        self._pending = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._pending = []

    def _fold_ema(self, params: list[torch.Tensor]) -> list[int]:
        """Fold finite pending captures into their EMA slots (unscaled), in one pass each.

        Returns the capture slots dropped for non-finite values (the step reports them as skipped)."""
        dropped: list[int] = []
        for slot, (tensors, inv_scale) in enumerate(self._pending):
            present = [t for t in tensors if t is not None]
            if not present:
                continue
            verdict = capture_verdict(_dist.global_sq_norm(present, self.backend))
            if verdict == "nonfinite":
                dropped.append(slot)  # a non-finite capability gradient never enters the EMA
                continue
            if verdict == "zero":
                continue
            while len(self._ema) <= slot:
                self._ema.append([None] * len(params))
                self._ema_count.append(0)
            if len(self._ema[slot]) != len(params):
                raise ValueError("the optimizer's parameter list changed size since the EMA was created")
            fold_ema_(self._ema[slot], tensors, first=self._ema_count[slot] == 0, beta=self.ema_beta,
                      inv_scale=inv_scale, dtype=self.reference_dtype)
            self._ema_count[slot] += 1
        self._pending = []
        return dropped

    def _refresh_with_reference_fn(self, params: list[torch.Tensor]) -> None:
        if self.reference_fn is None or self.activation_subspace is not None:
            return  # with activation_subspace, reference_fn refreshes the bases (step()), not a reference
        due = self.reference == "live" or self._steps % self.refresh_every == 0 or not self._ema
        if not due:
            return
        stash = GradStash(params)
        try:
            with torch.enable_grad():
                loss = self.reference_fn()
                if self.scaler is not None and getattr(self.scaler, "is_enabled", lambda: True)():
                    loss = self.scaler.scale(loss)
                loss.backward()
            self.capture_reference()
        finally:
            stash.restore()

    def _reference_lists(self, params: list[torch.Tensor]) -> tuple[list[list[torch.Tensor | None]], list[float]]:
        if self.reference == "live":
            refs = [t for t, _ in self._pending]
            scales = [s for _, s in self._pending]
        else:
            refs = [e for e, c in zip(self._ema, self._ema_count) if c > 0]
            scales = [1.0] * len(refs)
        if self.subspace is not None and self.subspace.rank:
            if len(self.subspace.shapes) != len(params):
                raise ValueError(f"subspace covers {len(self.subspace.shapes)} tensors, optimizer has {len(params)}")
            refs += [list(v) for v in self.subspace.basis]
            scales += [1.0] * self.subspace.rank
        return refs, scales

    # -- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Project the gradients (or the update) against the references, step the wrapped optimizer, then
        (with ``activation_subspace``) project the realised update of the protected parameters."""
        sub = self.activation_subspace
        if sub is None:
            return self._step_references(closure)
        refreshed = None
        if self.reference_fn is not None:
            # step 0: an int interval always rebuilds; a RefreshSchedule builds only bases that do not exist yet
            at_start = not isinstance(self.refresh_every, RefreshSchedule) or sub.updates == 0
            refreshed = refresh_if_due(self.refresh_every, self._steps,
                                       lambda tol: refresh(sub, self.reference_fn, tol), at_start=at_start)
        if refreshed is None and sub.updates == 0:
            if not sub.has_observed():  # checked here, not at construction: load_state_dict() may bring bases
                raise ValueError(
                    "activation_subspace has observed no capability data and has no bases, so this step would "
                    "protect nothing (only freeze biases and norms): observe() capability forwards first, build "
                    "it with ActivationSubspace.from_loader(model, capability_loader), load a checkpoint, or pass "
                    "reference_fn= (a no-grad capability forward, observed before the first step)")
            sub.update()  # observed but never turned into bases: the first step would protect nothing
        managed = {id(p) for p in self._params()}
        if self.activation_target == "grad":
            return self._step_activation_grad(sub, managed, closure)
        snapshot = UpdateSnapshot.take(sub, managed)
        result = self._step_references(closure)
        act = snapshot.project(self.backend, device=self._first_device())
        if self.last_stats is not None:
            self.last_stats.activation = act
        return result

    def _step_activation_grad(self, sub: Any, managed: set[int], closure: Callable[[], float] | None) -> Any:
        """activation_target='grad': project the safety gradient, then step with the PTX references added."""
        if closure is not None:
            raise ValueError("activation_target='grad' projects the gradients present when step() is called; a "
                             "closure would recompute them after the projection. Call backward() before step()")
        protected = [p for p in sub.parameters() if id(p) in managed and p.grad is not None]
        act = (sub.project_updates_(protected, [p.grad for p in protected], backend=self.backend) if protected
               else empty_stats(sub, self._first_device()))
        result = self._step_references(None, strength=0.0 if self.ptx_weight > 0 else None)
        if self.last_stats is not None:
            self.last_stats.activation = act
        return result

    def _step_references(self, closure: Callable[[], float] | None = None, strength: float | None = None) -> Any:
        """Project the gradients (or the update) against the references, then step the wrapped optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        self._refuse_sharded_subspace(params)
        self._refuse_everything_captured(params)
        self._refresh_with_reference_fn(params)
        dropped = self._fold_ema(params) if self.reference == "ema" else []
        refs, scales = self._reference_lists(params)
        self._pending = []
        self._steps += 1

        # Parameters that take part: a gradient now and a tensor in every reference.
        idx = [i for i, p in enumerate(params)
               if p.grad is not None and all(r[i] is not None for r in refs)]
        device = params[idx[0]].device if idx else (params[0].device if params else torch.device("cpu"))
        if dropped:
            # As a live non-finite capture does (project_ skips on its non-finite Gram): nothing is projected
            # this step and the EMA stays as it was.
            which = ", ".join(str(j) for j in dropped)
            self.last_stats = unprojected_stats(device, skipped=True, note=(
                f"non-finite values (inf/NaN) in capture{'s' if len(dropped) > 1 else ''} {which}: not folded "
                f"into the EMA; gradient left untouched"))
            result = self.optimizer.step()
            return loss if loss is not None else result
        if not refs or not idx:
            note = None
            if not refs and getattr(self, "activation_subspace", None) is None:
                note = NO_REFERENCES
                self._warn_no_references()
            elif refs and any(p.grad is not None for p in params):
                note = "no parameter has both a gradient and a reference"
            self.last_stats = unprojected_stats(device, note=note)
            result = self.optimizer.step()
            return loss if loss is not None else result

        grads = [params[i].grad for i in idx]
        ref_lists = [[r[i] for i in idx] for r in refs]
        k = len(ref_lists)

        if self.target == "grad":
            grads, ref_lists, impl, reduce_grams = _dist.local_backend(self.backend, grads, ref_lists)
            device = grads[0].device
            extra = None
            if self.ptx_weight > 0:
                # combine_ subtracts: a coefficient of -lambda*s_j/k adds lambda * mean(unscaled refs).
                shape = (len(grads), k) if self.granularity == "tensor" else (k,)
                per_ref = torch.tensor([-self.ptx_weight * s / k for s in scales], dtype=torch.float64, device=device)
                extra = per_ref.expand(shape)
            self.last_stats = project_resolved(impl, grads, ref_lists, self.mode,
                                                self.strength if strength is None else strength, self.granularity,
                                                extra_coefs=extra, reduce_grams=reduce_grams)
            result = self.optimizer.step()
            return loss if loss is not None else result

        # target == "update": one copy of the touched parameters, then project the realised update.
        touched = [params[i] for i in idx]
        before = [p.detach().clone() for p in touched]
        # Localised (and validated) before the wrapped step: the clones' local shards are what gets projected.
        before, ref_lists, impl, reduce_grams = _dist.local_backend(self.backend, before, ref_lists)
        result = self.optimizer.step()
        now = [local(p.detach()) for p in touched]
        torch._foreach_sub_(before, now)  # before <- -(update): the descent direction, like a gradient
        # g' = d - R^T c  =>  new params = old - d' = now + R^T c: combine_(params, R, -c).
        self.last_stats = project_resolved(impl, before, ref_lists, self.mode, self.strength, self.granularity,
                                            apply_to=now, sign=-1.0, reduce_grams=reduce_grams)
        del before
        return loss if loss is not None else result

    def _warn_no_references(self) -> None:
        if self._warned_no_references:
            return
        self._warned_no_references = True
        warnings.warn(
            "ProjectedOptimizer.step(): no references to project against (no capture_reference() since the "
            "last zero_grad()/step(), no EMA yet, no subspace, no reference_fn), so this is a plain, unprojected "
            "step; last_stats.reason says 'no references'. Capture after zero_grad(), not before it. "
            "(Warned once per optimizer.)", UserWarning, stacklevel=user_stacklevel())

    def _refuse_everything_captured(self, params: list[torch.Tensor]) -> None:
        """Captures are pending but no parameter has a gradient: the safety backward ran before capturing."""
        if self._pending and params and all(p.grad is None for p in params):
            raise RuntimeError(
                "step(): capture_reference() took every gradient and none was computed after it, so this step "
                "would change no weight. The safety backward must come after capture_reference(): "
                "zero_grad(); capability.backward(); capture_reference(); safety.backward(); step()"
            )

    def _refuse_sharded_subspace(self, params: list[torch.Tensor]) -> None:
        if self.subspace is None:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if _dist.has_dtensor(list(params) + grads, []):
            raise NotImplementedError(
                "a Subspace with sharded (DTensor, FSDP2/HSDP) parameters is not supported: Subspace.add "
                "orthonormalises with shard-local dot products. Use live or EMA references (captured gradients) "
                "under fully_shard, or keep the Subspace on unsharded (DDP/single-process) parameters"
            )

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state plus the wrapper's settings, EMA buffers and subspace."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict` of this wrapper, or a plain state dict of the wrapped optimizer.

        The constructor's settings (mode, strength, ...) win: a checkpoint saved with other settings loads
        its optimizer state, EMA buffers and subspace, with a ``UserWarning`` naming what differs. A plain
        inner-optimizer state dict (e.g. an AdamW fine-tuning checkpoint, keys ``state``/``param_groups``)
        loads into the wrapped optimizer, and the wrapper starts fresh (no EMA, step count 0).
        """
        checkpoint.load_state_dict(self, state_dict)
