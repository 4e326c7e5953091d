"""``project_``: remove from a gradient its component along reference directions, in place.

Every mode reduces to the two fused passes of :mod:`atax_kernels.ops`:

1. ``gram`` over ``[g, r_1 .. r_k]`` gives ``G = R R^T`` (k x k), ``b = R g`` and ``|g|^2``;
2. a tiny float64 solve on the tensors' device turns them into coefficients ``c``;
3. ``combine_`` applies ``g <- g - R^T c`` in place.

Modes (``alpha`` = strength):

* ``orthogonal``: ``c = alpha * G^+ b`` (pseudo-inverse with a relative eigenvalue cut-off, so
  dependent or zero references are harmless);
* ``conflict``: the closest ``g'`` with ``R g' >= 0``: ``c = -alpha * mu`` with
  ``mu = argmin_{mu >= 0} 1/2 mu^T G mu + mu^T b`` (PCGrad for k = 1, the cone projection for k > 1).

With one reference on a GPU kernel backend no value is read on the host, so a step is CUDA-graph
capturable; reading a :class:`ProjectionStats` field is then the only synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import _validate as V
from ._cone import CONE_RTOL, nonneg_quadratic_min, nonneg_quadratic_min_batch  # noqa: F401 (re-exported)
from .ops.registry import Backend, resolve

MODES = ("orthogonal", "conflict")
GRANULARITIES = ("global", "tensor")

#: Eigenvalues of G below this fraction of the largest are treated as zero. Gram entries carry fp32
#: product rounding (relative ~1e-7 of |r_i||r_j|), so directions weaker than this are noise, and
#: inverting them would inject O(|g|) garbage.
EIG_RTOL = 1e-5


@dataclass
class ProjectionStats:
    """What one :func:`project_` call did. Fields are tensors on the gradients' device.

    Reading a field (``.item()``, printing) is the only host synchronisation ``project_`` needs.

    Attributes:
        dots: ``[k]`` dot products ``<g, r_j>`` over the whole gradient, before projection.
        cosines: ``[k]`` cosine similarities between ``g`` and each reference (0 for a zero vector).
        coefs: ``[k]`` (global) or ``[n_tensors, k]`` (tensor granularity) coefficients ``c`` applied as
            ``g <- g - sum_j c_j r_j``.
        removed_fraction: scalar ``|g - g'| / |g|`` (0 when ``g`` is zero).
        projected: scalar bool, True when anything was removed.
        skipped: scalar bool, True when the Gram was non-finite and the gradient was left untouched.
        reason: (property, synchronises) why nothing was applied, as a sentence, or None: which side was
            non-finite when ``skipped``. The optimizer wrapper's ``last_stats`` also reports here
            steps that had nothing to project against (``"no references"``).
    """

    dots: torch.Tensor
    cosines: torch.Tensor
    coefs: torch.Tensor
    removed_fraction: torch.Tensor
    projected: torch.Tensor
    skipped: torch.Tensor
    _nonfinite_grad: torch.Tensor = field(repr=False)
    _nonfinite_refs: torch.Tensor = field(repr=False)
    #: A reason set by the caller (the optimizer wrapper: "no references", a dropped EMA capture); wins.
    _note: str | None = field(default=None, repr=False)
    #: The optimizer wrapper's activation projection of this step (an ``ActivationStats``), or None.
    activation: Any = field(default=None, repr=False)

    @property
    def update_removed_fraction(self) -> torch.Tensor | None:
        """Scalar ``|removed| / |update|`` of the activation projection this step (None without one)."""
        return None if self.activation is None else self.activation.update_removed_fraction

    @property
    def feature_ranks(self) -> dict[str, int] | None:
        """Per protected module, its activation basis rank this step (None without an activation subspace)."""
        return None if self.activation is None else self.activation.ranks

    @property
    def reason(self) -> str | None:
        """Why the projection was skipped (which side was non-finite), or None. Synchronises."""
        if self._note is not None:
            return self._note
        if not bool(self.skipped):
            return None
        parts = []
        if bool(self._nonfinite_grad):
            parts.append("the gradient")
        bad = torch.nonzero(self._nonfinite_refs).flatten().tolist()
        if bad:
            parts.append("reference" + ("s " if len(bad) > 1 else " ") + ", ".join(str(j) for j in bad))
        return "non-finite values (inf/NaN) in " + " and ".join(parts) + "; gradient left untouched"

    def __repr__(self) -> str:
        # Hand-written so ``reason`` (a property, not a field) shows; reading it synchronises, as printing
        # any field does.
        shown = ", ".join(f"{f}={getattr(self, f)!r}" for f in
                          ("dots", "cosines", "coefs", "removed_fraction", "projected", "skipped"))
        return f"ProjectionStats({shown}, reason={self.reason!r})"

    def as_dict(self) -> dict[str, Any]:
        """Host copy of every field (one sync), convenient for logging."""
        return {
            "dots": self.dots.tolist(),
            "cosines": self.cosines.tolist(),
            "coefs": self.coefs.tolist(),
            "removed_fraction": float(self.removed_fraction),
            "projected": bool(self.projected),
            "skipped": bool(self.skipped),
            "reason": self.reason,
        }


def _pinv_solve(G: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``G^+ b`` for symmetric PSD ``G`` (batched ``[..., k, k]``), cutting eigenvalues below EIG_RTOL·max."""
    w, Q = torch.linalg.eigh(G)
    top = w.amax(dim=-1, keepdim=True)
    keep = (w > EIG_RTOL * top) & (top > 0)
    inv = torch.where(keep, 1.0 / torch.where(keep, w, torch.ones_like(w)), torch.zeros_like(w))
    coords = (Q.transpose(-1, -2) @ b.unsqueeze(-1)).squeeze(-1)
    return (Q @ (inv * coords).unsqueeze(-1)).squeeze(-1)


def _solve_coefs(
    G: torch.Tensor, b: torch.Tensor, gg: torch.Tensor, mode: str, strength: float,
    cone_rtol: float = CONE_RTOL, max_rank: Sequence[int] | None = None,
) -> torch.Tensor:
    """Coefficients ``c`` (``g' = g - R^T c``) for one or a batch of problems (leading dims of ``b``).

    ``cone_rtol``: conflicts smaller than this (a cosine) are left in place by the cone solve.
    ``max_rank``: per problem (flattened), the number of elements its vectors have, when known: with more
    references than that, the cone solve removes the Gram's null directions (see ``_cone``) and returns the
    minimum-norm coefficients, which may then have either sign.
    """
    k = b.shape[-1]
    if k == 1:
        denom = G[..., 0, :]  # [..., 1]
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        numer = b if mode == "orthogonal" else torch.clamp(b, max=0.0)
        return torch.where(denom > 0, strength * numer / safe, torch.zeros_like(b))
    # Solve in the scale-free coordinates of unit references (G -> D G D, b -> D b, c = D c_hat) so the
    # eigenvalue cut-off and the active-set tolerances do not depend on how references are scaled.
    diag = torch.diagonal(G, dim1=-2, dim2=-1)
    d = torch.where(diag > 0, 1.0 / torch.sqrt(torch.where(diag > 0, diag, torch.ones_like(diag))),
                    torch.zeros_like(diag))
    G_hat = G * d.unsqueeze(-1) * d.unsqueeze(-2)
    b_hat = b * d
    if mode == "orthogonal":
        return strength * d * _pinv_solve(G_hat, b_hat)
    # One host copy for the whole batch (this is the sync k >= 2 needs); see _cone for the solve.
    Gh, bh, ggh = G_hat.cpu().numpy(), b_hat.cpu().numpy(), gg.cpu().numpy()
    ranks = None if max_rank is None else np.asarray(max_rank, dtype=np.int64).reshape(-1)
    mu = nonneg_quadratic_min_batch(Gh.reshape(-1, k, k), bh.reshape(-1, k), ggh.reshape(-1), cone_rtol, ranks)
    mu = mu.reshape(bh.shape)
    return -strength * d * torch.from_numpy(mu).to(b.device)


def _split(grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return grams[..., 1:, 1:], grams[..., 1:, 0], grams[..., 0, 0]


def _coefs_k1(grams: torch.Tensor, mode: str, alpha: float) -> torch.Tensor:
    """Coefficients ``[1]`` (or ``[n, 1]``) for one reference, sync-free, in as few ops as the math allows.

    c = alpha * b / |r|^2 (conflict: min(b, 0)); 0 where |r|^2 = 0 or c overflows, and 0 everywhere when
    any Gram entry is non-finite (the combine pass then skips the reference, so nothing is written).
    Finiteness is tested as ``x * 0 != 0`` (true for inf and NaN) on ``c + sum(grams)``: one check covers
    the division by zero and every Gram entry. 9 ops (10 with alpha < 1); GPU habits: budget the op count.
    """
    row = grams.select(-2, 1)  # [..., 2] = (<g, r>, |r|^2)
    rr = row.narrow(-1, 1, 1)
    b = row.narrow(-1, 0, 1)
    if mode != "orthogonal":
        b = torch.clamp(b, max=0.0)
    c = b / rr if alpha == 1.0 else (b * alpha) / rr
    bad = ((c + grams.sum()) * 0.0) != 0.0
    return c.masked_fill(bad, 0.0)


def _stats_fields(grams: torch.Tensor, coefs: torch.Tensor, per_tensor: bool) -> dict[str, torch.Tensor]:
    """Every :class:`ProjectionStats` field from the Gram(s) and the applied coefficients (no data pass)."""
    total = grams.sum(0) if per_tensor else grams
    G_tot, b_tot, gg_tot = _split(total)
    diag = torch.diagonal(G_tot)
    nonfinite_grad = ~torch.isfinite(gg_tot)
    # A reference is blamed when its own norm is non-finite; a NaN cross term with finite norms cannot
    # happen, but a non-finite b with a finite |g| would point at the reference too.
    nonfinite_refs = ~torch.isfinite(diag) | (~torch.isfinite(b_tot) & ~nonfinite_grad)
    all_finite = torch.isfinite(grams).all()
    denom = torch.sqrt(torch.clamp(gg_tot, min=0) * torch.clamp(diag, min=0))
    cosines = torch.where(denom > 0, b_tot / torch.where(denom > 0, denom, torch.ones_like(denom)),
                          torch.zeros_like(b_tot))
    G = torch.where(all_finite, _split(grams)[0], torch.zeros((), dtype=grams.dtype, device=grams.device))
    # |g - g'|^2 = c^T G c (per tensor, summed), from the Gram alone: no extra pass.
    removed_sq = (coefs.unsqueeze(-2) @ G @ coefs.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    if per_tensor:
        removed_sq = removed_sq.sum()
    gg_safe = torch.where(gg_tot > 0, gg_tot, torch.ones_like(gg_tot))
    removed = torch.where(gg_tot > 0, torch.sqrt(torch.clamp(removed_sq, min=0) / gg_safe),
                          torch.zeros_like(gg_tot))
    return dict(dots=b_tot, cosines=cosines, coefs=coefs, removed_fraction=removed,
                projected=(coefs != 0).any(), skipped=~all_finite,
                _nonfinite_grad=nonfinite_grad, _nonfinite_refs=nonfinite_refs)


class _DeferredStats(ProjectionStats):
    """:class:`ProjectionStats` whose fields are computed from the Gram on first access.

    The per-step path then runs only the ops the combine pass needs; statistics nobody reads cost nothing.
    The Gram and coefficients it keeps are the call's own outputs (never written afterwards).
    """

    def __init__(self, grams: torch.Tensor, coefs: torch.Tensor, per_tensor: bool):  # noqa: D107
        self.__dict__["_deferred"] = (grams, coefs, per_tensor)

    def __getattr__(self, name: str) -> Any:
        src = self.__dict__.get("_deferred")
        if src is None or name.startswith("__"):
            raise AttributeError(name)
        self.__dict__.update(_stats_fields(*src))
        del self.__dict__["_deferred"]
        return getattr(self, name)


def project_(
    grads: Sequence[torch.Tensor] | torch.Tensor,
    refs: Any,
    *,
    mode: str = "orthogonal",
    strength: float = 1.0,
    granularity: str = "global",
    backend: str | None = None,
) -> ProjectionStats:
    """Project ``grads`` in place away from (or out of conflict with) reference directions.

    Args:
        grads: gradient tensors (e.g. ``[p.grad for p in params]``), modified in place. A single tensor is
            accepted as a one-item list. Non-contiguous tensors, mixed dtypes and non-overlapping views of
            one flat buffer all work.
        refs: one reference direction (a tensor, or a sequence of tensors parallel to ``grads``), several
            (a sequence of such sequences), or a :class:`~atax_kernels.Subspace` (orthonormal: no solve).
        mode: ``"orthogonal"`` removes the span of the references; ``"conflict"`` removes only the part
            that conflicts (``R g' >= 0``; PCGrad for one reference, the cone projection for several).
        strength: alpha in [0, 1], the fraction of the computed component that is removed.
        granularity: ``"global"`` treats all tensors as one vector; ``"tensor"`` projects each tensor
            independently (layer-wise).
        backend: ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"``, or None for the fastest available
            (``ATAX_BACKEND`` overrides the default).

    Returns:
        :class:`ProjectionStats`. When any Gram entry is non-finite, every gradient is left bit-for-bit
        untouched and ``skipped`` is True (``reason`` says which side was non-finite).

    Raises:
        TypeError, ValueError: on bad input, before anything is modified.

    Distributed: DTensor gradients (FSDP2 ``fully_shard``, HSDP) are projected shard-locally with global
    dot products (one all-reduce of the Gram over the sharded mesh dimensions); see docs/distributed.md.
    """
    if torch.compiler.is_compiling():
        return _project_compiled(grads, refs, mode, strength, granularity, backend)
    return _project_impl(grads, refs, mode, strength, granularity, backend)


def _project_impl(
    grads: Any, refs: Any, mode: str, strength: float, granularity: str, backend: str | None,
    reduce_grams: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ProjectionStats:
    """``project_`` without the compile dispatch; ``reduce_grams`` sums local Grams across ranks."""
    grad_list = V.as_tensor_list(grads, "grads")
    from .subspace import Subspace

    # The no-solve shortcut needs a basis stored precisely enough to be orthonormal (not bf16/fp16).
    orthonormal = isinstance(refs, Subspace) and all(d in (torch.float32, torch.float64) for d in refs.dtypes)
    if isinstance(refs, Subspace):
        if refs.rank == 0 and grad_list:
            raise ValueError("refs is an empty Subspace (rank 0): add directions first")
        refs = refs.basis
    if not grad_list and isinstance(refs, (list, tuple)) and len(refs) == 0:
        # No gradients (a fully frozen model): nothing to project, so empty references are no error.
        ref_lists: list[list[torch.Tensor]] = []
    else:
        ref_lists = V.normalize_refs(refs, "refs")
    mode = V.check_choice(mode, "mode", MODES)
    granularity = V.check_choice(granularity, "granularity", GRANULARITIES)
    alpha = V.check_strength(strength)
    labels = [f"refs[{j}]" for j in range(len(ref_lists))] if len(ref_lists) > 1 else ["refs"]
    V.check_parallel(grad_list, "grads", ref_lists, labels)
    wrap_impl = None
    from . import distributed as _dist

    if _dist.has_dtensor(grad_list, ref_lists):  # FSDP2/HSDP: shard-local tensors, globally reduced Gram
        grad_list, ref_lists, reduce_grams, wrap_impl = _dist.localize(grad_list, ref_lists, labels, reduce_grams)
    k, n = len(ref_lists), len(grad_list)
    if n == 0:
        zero = torch.zeros((), dtype=torch.float64)
        false = torch.zeros((), dtype=torch.bool)
        return ProjectionStats(
            dots=torch.zeros(k, dtype=torch.float64), cosines=torch.zeros(k, dtype=torch.float64),
            coefs=torch.zeros(k, dtype=torch.float64), removed_fraction=zero, projected=false,
            skipped=false.clone(), _nonfinite_grad=false.clone(), _nonfinite_refs=torch.zeros(k, dtype=torch.bool),
        )
    V.check_no_overlap(grad_list, "grads", ref_lists, labels)
    device = grad_list[0].device
    dtypes = {t.dtype for lst in [grad_list, *ref_lists] for t in lst}
    impl = resolve(backend, device, dtypes)
    if wrap_impl is not None:
        impl = wrap_impl(impl)
    return _project_resolved(impl, grad_list, ref_lists, mode, alpha, granularity,
                             orthonormal=orthonormal and granularity == "global", reduce_grams=reduce_grams)


def _project_resolved(
    impl: Backend,
    grads: list[torch.Tensor],
    refs: list[list[torch.Tensor]],
    mode: str,
    alpha: float,
    granularity: str,
    *,
    orthonormal: bool = False,
    apply_to: list[torch.Tensor] | None = None,
    sign: float = 1.0,
    extra_coefs: torch.Tensor | None = None,
    reduce_grams: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ProjectionStats:
    """Gram -> solve -> combine. Internal knobs used by the optimizer wrapper:

    ``orthonormal``: the references are an orthonormal basis (G = I): no solve. ``apply_to``/``sign``:
    apply ``sign * coefs`` to other tensors than ``grads`` (update projection applies ``-c`` to the
    parameters). ``extra_coefs``: added to the solved coefficients in the same combine pass (PTX mixing);
    not counted in ``removed_fraction``. ``reduce_grams``: applied to the local Gram(s) right after the
    gram pass (e.g. an all-reduce over the ranks that hold disjoint shards), so every rank solves, skips
    and reports from the same global values.
    """
    per_tensor = granularity == "tensor"
    k = len(refs)
    grams = impl.gram([grads, *refs], per_tensor)
    if reduce_grams is not None:
        grams = reduce_grams(grams)
    target = grads if apply_to is None else apply_to
    if k == 1 and not orthonormal and extra_coefs is None:
        # The common case, on every backend: no host sync, a handful of ops, statistics on demand.
        coefs = _coefs_k1(grams, mode, alpha)
        impl.combine_(target, refs, coefs * sign if sign != 1.0 else coefs)
        return _DeferredStats(grams, coefs, per_tensor)
    all_finite = torch.isfinite(grams).all()

    can_sync = not impl.sync_free or k > 1
    if can_sync and not bool(all_finite):
        # Early exit on the host: nothing is written, a GradScaler still sees its inf where it was.
        coefs = torch.zeros((len(grads), k) if per_tensor else (k,), dtype=torch.float64, device=grams.device)
        return _DeferredStats(grams, coefs, per_tensor)

    G, b, gg = _split(grams)
    if not can_sync:
        # Sync-free path (k = 1): zero the Gram where it is non-finite so the solve stays finite; the zero
        # coefficient then makes combine_ skip the reference entirely.
        G = torch.where(all_finite, G, torch.zeros_like(G))
        b = torch.where(all_finite, b, torch.zeros_like(b))
        gg = torch.where(all_finite, gg, torch.zeros_like(gg))
    if orthonormal:
        coefs = alpha * (b if mode == "orthogonal" else torch.clamp(b, max=0.0))
    else:
        # The vectors' length bounds rank(G) (k > n: tiny tensors, tensor granularity). Only for local Grams:
        # after reduce_grams the vectors are shards of a longer whole, whose length is not known here.
        max_rank = None
        if mode == "conflict" and k > 1 and reduce_grams is None:
            sizes = [t.numel() for t in grads]
            max_rank = sizes if per_tensor else [sum(sizes)]
        coefs = _solve_coefs(G, b, gg, mode, alpha, max_rank=max_rank)
    if not can_sync:
        coefs = torch.where(all_finite, coefs, torch.zeros_like(coefs))
    applied = coefs if extra_coefs is None else coefs + extra_coefs.to(coefs)
    applied = applied * sign if sign != 1.0 else applied
    impl.combine_(target, refs, applied.contiguous())
    return _DeferredStats(grams, coefs, per_tensor)


# --- torch.compile support ------------------------------------------------------------------------
# Dynamo cannot trace the validation (memory addresses) or the host-side solves, so under compilation
# project_ becomes one opaque custom op with a fake implementation: `torch.compile(fullgraph=True)` sees a
# single node that mutates the gradients, and the eager implementation runs inside it.

_STAT_FIELDS = ("dots", "cosines", "coefs", "removed_fraction", "projected", "skipped",
                "_nonfinite_grad", "_nonfinite_refs")


@torch.library.custom_op("atax_py::project_", mutates_args=("grads",))
def _project_op(
    grads: list[torch.Tensor], refs: list[torch.Tensor], k: int, projection_mode: str, strength: float,
    granularity: str, backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    n = len(grads)
    ref_lists = [list(refs[j * n:(j + 1) * n]) for j in range(k)]
    stats = project_(grads, ref_lists, mode=projection_mode, strength=strength, granularity=granularity, backend=backend)
    device = grads[0].device if grads else torch.device("cpu")
    return tuple(getattr(stats, f).to(device).clone() for f in _STAT_FIELDS)  # type: ignore[return-value]


@_project_op.register_fake
def _project_op_fake(grads, refs, k, projection_mode, strength, granularity, backend):
    device = grads[0].device if grads else torch.device("cpu")
    f64 = dict(dtype=torch.float64, device=device)
    b = dict(dtype=torch.bool, device=device)
    coef_shape = (len(grads), k) if granularity == "tensor" else (k,)
    return (torch.empty(k, **f64), torch.empty(k, **f64), torch.empty(coef_shape, **f64), torch.empty((), **f64),
            torch.empty((), **b), torch.empty((), **b), torch.empty((), **b), torch.empty(k, **b))


def _project_compiled(grads, refs, mode, strength, granularity, backend) -> ProjectionStats:
    grad_list = list(grads) if not isinstance(grads, torch.Tensor) else [grads]
    ref_lists = V.normalize_refs(refs, "refs")
    flat = [t for lst in ref_lists for t in lst]
    out = _project_op(grad_list, flat, len(ref_lists), mode, float(strength), granularity, backend)
    return ProjectionStats(**dict(zip(_STAT_FIELDS, out)))
