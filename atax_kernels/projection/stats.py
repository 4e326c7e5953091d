"""What one projection did: :class:`ProjectionStats`, computed lazily from the Gram (no extra data pass)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .solve import split_gram

__all__ = ["ProjectionStats", "DeferredStats", "stats_fields", "unprojected_stats"]


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


def stats_fields(grams: torch.Tensor, coefs: torch.Tensor, per_tensor: bool) -> dict[str, torch.Tensor]:
    """Every :class:`ProjectionStats` field from the Gram(s) and the applied coefficients (no data pass)."""
    total = grams.sum(0) if per_tensor else grams
    G_tot, b_tot, gg_tot = split_gram(total)
    diag = torch.diagonal(G_tot)
    nonfinite_grad = ~torch.isfinite(gg_tot)
    # A reference is blamed when its own norm is non-finite; a NaN cross term with finite norms cannot
    # happen, but a non-finite b with a finite |g| would point at the reference too.
    nonfinite_refs = ~torch.isfinite(diag) | (~torch.isfinite(b_tot) & ~nonfinite_grad)
    all_finite = torch.isfinite(grams).all()
    denom = torch.sqrt(torch.clamp(gg_tot, min=0) * torch.clamp(diag, min=0))
    cosines = torch.where(denom > 0, b_tot / torch.where(denom > 0, denom, torch.ones_like(denom)),
                          torch.zeros_like(b_tot))
    G = torch.where(all_finite, split_gram(grams)[0], torch.zeros((), dtype=grams.dtype, device=grams.device))
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


class DeferredStats(ProjectionStats):
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
        self.__dict__.update(stats_fields(*src))
        del self.__dict__["_deferred"]
        return getattr(self, name)


def unprojected_stats(device: torch.device, k: int = 0, *, note: str | None = None,
                      skipped: bool = False) -> ProjectionStats:
    """Stats of a step where nothing was projected (no references, or skipped), with ``note`` as its reason."""

    f = torch.zeros(k, dtype=torch.float64, device=device)
    z = torch.zeros((), dtype=torch.float64, device=device)
    no = torch.zeros((), dtype=torch.bool, device=device)
    return ProjectionStats(dots=f, cosines=f.clone(), coefs=f.clone(), removed_fraction=z, projected=no,
                           skipped=torch.full((), skipped, dtype=torch.bool, device=device),
                           _nonfinite_grad=no.clone(),
                           _nonfinite_refs=torch.zeros(k, dtype=torch.bool, device=device), _note=note)
