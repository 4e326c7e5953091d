"""The geometric "tax rate" between the safety and capability gradient subspaces: :func:`tax_rate` -> :class:`TaxRate`."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .. import _validate as validate
from ..ops import gram

__all__ = ["TaxRate", "tax_rate"]


# ---------------------------------------------------------------------------------------------------------
# Tax rate: principal angles between the safety and capability gradient spans
# ---------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class TaxRate:
    """Result of :func:`tax_rate`.

    Attributes:
        cosines: float64 ``[min(rank_safety, rank_capability)]`` cosines of the principal angles between
            span(safety grads) and span(capability grads), descending, in ``[0, 1]``.
        angles_deg: the principal angles in degrees, ascending (same order as ``cosines``).
        rate: ``sum(cosines**2) / rank_safety`` — see :func:`tax_rate`. In ``[0, 1]``.
        rank_safety, rank_capability: numerical ranks of the two spans (after the ``rtol`` cut).
    """

    cosines: torch.Tensor
    angles_deg: torch.Tensor
    rate: float
    rank_safety: int
    rank_capability: int

    def __str__(self) -> str:
        ang = ", ".join(f"{a:.1f}" for a in self.angles_deg.tolist()[:8])
        more = ", ..." if self.angles_deg.numel() > 8 else ""
        return (
            f"tax rate {self.rate:.4f} (rank safety {self.rank_safety}, capability {self.rank_capability}; "
            f"principal angles [{ang}{more}] deg)"
        )


def _gradient_lists(grads: Any, name: str) -> list[list[torch.Tensor]]:
    if isinstance(grads, torch.Tensor) or not isinstance(grads, (list, tuple)):
        raise TypeError(
            f"{name} must be a list of gradients, each a list of tensors (parallel to the parameters), "
            f"got {type(grads).__name__}"
        )
    if len(grads) == 0:
        raise ValueError(f"{name} is empty: give at least one sampled gradient")
    if all(isinstance(g, torch.Tensor) for g in grads):
        raise TypeError(
            f"{name} is a list of tensors, i.e. one gradient; pass a list of gradients, each a list of "
            f"tensors (wrap a single gradient as [grad], a one-tensor gradient as [[t]])"
        )
    out = []
    for j, g in enumerate(grads):
        if not isinstance(g, (list, tuple)):
            raise TypeError(f"{name}[{j}] must be a list of tensors, got {type(g).__name__}")
        lst = []
        for i, t in enumerate(g):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{j}][{i}] is a {type(t).__name__ if t is not None else 'None'}, "
                                f"expected a torch.Tensor")
            lst.append(t.detach())
        out.append(validate.as_tensor_list(lst, f"{name}[{j}]"))
    return out


def _whitener(g: torch.Tensor, rtol: float) -> torch.Tensor:
    """``W`` (m x r) with ``W^T G W = I_r`` spanning G's numerical range (eigenvalues > rtol * max)."""
    evals, evecs = torch.linalg.eigh(g)
    top = float(evals.max()) if evals.numel() else 0.0
    if not top > 0:
        return g.new_zeros((g.shape[0], 0))
    keep = evals > rtol * top
    return evecs[:, keep] / evals[keep].sqrt()


def tax_rate(
    safety_grads: Sequence[Sequence[torch.Tensor]],
    capability_grads: Sequence[Sequence[torch.Tensor]],
    *,
    rtol: float | None = None,
    backend: str | None = None,
) -> TaxRate:
    """Principal angles between span(safety grads) and span(capability grads), and the tax rate.

    Each gradient is a list of tensors parallel to the parameters (e.g. ``[p.grad.clone() for p in ...]``
    after one safety / capability batch). Nothing is flattened or copied: a single ``gram`` pass over all
    ``a + b`` gradients gives ``G = [[Gs, Gsc], [Gsc^T, Gc]]``. Each vector is first scaled to unit norm
    (same span, better conditioning; zero gradients are dropped), then each diagonal block is whitened
    through its eigen-decomposition, ``Ws = Es Λs^{-1/2}`` over eigenvalues above ``rtol * λmax`` (so
    duplicated or linearly dependent gradients are handled: ``Qs = S^T Ws`` is an orthonormal basis of the
    numerical span), and the cosines are the singular values of ``Qs^T Qc = Ws^T Gsc Wc``, clipped to
    ``[0, 1]``.

    Definition of the rate::

        rate = ||P_C P_S||_F^2 / rank(S) = sum_i cos^2(theta_i) / rank(S)

    i.e. the mean squared cosine over the ``rank(S)`` principal directions of the safety span (directions
    beyond ``rank(C)`` count as orthogonal). It equals ``E ||P_C u||^2`` for ``u`` uniform on the unit
    sphere of span(S): the expected fraction of the energy of a safety update (drawn isotropically from
    the sampled safety span) that lands in capability-sensitive directions, where it can interfere with
    capability. ``0`` = orthogonal spans (safety updates need not move capability directions at all: no
    tax expected from interference); ``1`` = the safety span lies inside the capability span (every
    safety step moves capability directions; projection methods cannot help). It is asymmetric on
    purpose: it asks how much of *safety* lives in *capability*, not the reverse. Being squared-cosine
    based it is rotation-invariant and does not depend on the gradients' norms. Note that with few samples
    in a huge parameter space random gradients are nearly orthogonal, so compare rates between methods or
    checkpoints at equal sample counts rather than reading the absolute value alone.

    Args:
        safety_grads: ``a >= 1`` sampled safety gradients.
        capability_grads: ``b >= 1`` sampled capability gradients (same tensor count, shapes and device).
        rtol: relative eigenvalue cut-off of the unit-normalised Gram blocks that defines the numerical
            rank. Default ``max(1e-5, eps)`` with ``eps`` the machine epsilon of the least precise input
            dtype: 1e-5 for float32/float64 (directions whose singular value is below ~0.3% of the largest
            are treated as noise), 7.8e-3 for bfloat16, 9.8e-4 for float16. The floor of 1e-5 exists
            because ``gram`` forms products in float32 on every backend (also for float64 inputs), so the
            Gram carries ~1e-7 relative error and whitening a direction with eigenvalue ``λ`` amplifies it
            by ``1/λ``.
        backend: backend of the ``gram`` pass (see :func:`atax_kernels.gram`).

    Accuracy: cosines are accurate to about 1e-6 (float32 products in ``gram``), not to float64 precision.

    Raises:
        TypeError / ValueError: malformed inputs (not lists of tensor lists, mismatched tensor counts or
            shapes, devices, non-floating dtypes), an empty list, all-zero or non-finite gradients.
    """
    s = _gradient_lists(safety_grads, "safety_grads")
    c = _gradient_lists(capability_grads, "capability_grads")
    labels = [f"safety_grads[{j}]" for j in range(1, len(s))] + [f"capability_grads[{j}]" for j in range(len(c))]
    validate.check_parallel(s[0], "safety_grads[0]", s[1:] + c, labels)
    if len(s[0]) == 0:
        raise ValueError("the gradients hold no tensors")
    if rtol is None:
        dtypes = {t.dtype for lst in s + c for t in lst}
        rtol = max(1e-5, max(torch.finfo(d).eps for d in dtypes))
    elif isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not (0.0 < float(rtol) < 1.0):
        raise ValueError(f"rtol must be a float in (0, 1), got {rtol!r}")
    a = len(s)
    g = gram(s + c, backend=backend).to("cpu", torch.float64)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("the gradients contain inf/NaN (their Gram matrix is not finite)")
    g = (g + g.T) / 2
    norms = g.diagonal().clamp(min=0).sqrt()
    scale = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    gn = g * scale[:, None] * scale[None, :]
    ns = torch.nonzero(norms[:a] > 0).flatten()
    nc = a + torch.nonzero(norms[a:] > 0).flatten()
    if ns.numel() == 0:
        raise ValueError("every safety gradient is zero: the safety span is {0}")
    if nc.numel() == 0:
        raise ValueError("every capability gradient is zero: the capability span is {0}")
    ws = _whitener(gn[ns][:, ns], float(rtol))
    wc = _whitener(gn[nc][:, nc], float(rtol))
    m = ws.T @ gn[ns][:, nc] @ wc
    cos = torch.linalg.svdvals(m).clamp(0.0, 1.0) if m.numel() else torch.zeros(0, dtype=torch.float64)
    cos = torch.sort(cos, descending=True).values
    angles = torch.rad2deg(torch.arccos(cos))
    rank_s, rank_c = int(ws.shape[1]), int(wc.shape[1])
    rate = float((cos**2).sum() / rank_s)
    return TaxRate(cosines=cos, angles_deg=angles, rate=min(1.0, max(0.0, rate)),
                   rank_safety=rank_s, rank_capability=rank_c)
