"""Paired alignment tax with a bootstrap confidence interval: :func:`measure_alignment_tax` -> :class:`TaxReport`."""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch


__all__ = ["TaxReport", "measure_alignment_tax", "MIN_RELIABLE_N"]


# ---------------------------------------------------------------------------------------------------------
# Paired alignment tax with a bootstrap confidence interval
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TaxReport:
    """Result of :func:`measure_alignment_tax`.

    Attributes:
        base_score: mean per-example score of the base model.
        aligned_score: mean per-example score of the aligned model.
        tax: ``base_score - aligned_score`` (positive = the aligned model lost capability).
        ci_low, ci_high: paired-bootstrap percentile confidence interval of ``tax`` at ``confidence``.
        n: number of examples.
        confidence: the confidence level of the interval (e.g. 0.95).
    """

    base_score: float
    aligned_score: float
    tax: float
    ci_low: float
    ci_high: float
    n: int
    confidence: float

    def __str__(self) -> str:
        pct = f"{100 * self.confidence:g}%"
        # A share of the base score only means something for a positive base (accuracy, pass rate); with
        # scores that can be negative (log-likelihoods, rewards) it is meaningless, so it is left out.
        rel = f", {100 * self.tax / self.base_score:+.1f}% of base" if self.base_score > 0 else ""
        small = f"; n < {MIN_RELIABLE_N}: the interval is unreliable" if self.n < MIN_RELIABLE_N else ""
        return (
            f"alignment tax {self.tax:+.4f} ({pct} CI [{self.ci_low:+.4f}, {self.ci_high:+.4f}]{rel}): "
            f"base {self.base_score:.4f} -> aligned {self.aligned_score:.4f} over n={self.n} examples{small}"
        )


#: Below this many examples ``measure_alignment_tax`` warns: a percentile bootstrap of a mean undercovers
#: badly on tiny samples (n = 4 has only 35 distinct resample means; identical differences give a
#: zero-width interval), and 30 is the usual rule of thumb for the mean's sampling distribution.
MIN_RELIABLE_N = 30


def _scores(value: Any, name: str) -> np.ndarray:
    """Per-example scores as a finite, non-empty 1-D float64 array."""
    if isinstance(value, torch.Tensor):
        arr = value.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: evaluate() must return a sequence of float scores ({exc})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name}: evaluate() must return one score per example (1-D), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: evaluate() returned no scores")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name}: score {int(bad[0])} is {arr[bad[0]]} ({bad.size} non-finite scores in all)")
    return arr


def measure_alignment_tax(
    base: Any,
    aligned: Any,
    evaluate: Callable[[Any], Any],
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> TaxReport:
    """Alignment tax ``mean(evaluate(base)) - mean(evaluate(aligned))`` with a paired-bootstrap CI.

    ``evaluate(model)`` must return one float score per example (a sequence, numpy array or tensor) for
    the same examples in the same order for both models; it is called once on ``base``, then once on
    ``aligned``. The interval resamples example indices (with replacement, numpy ``default_rng(seed)``)
    and takes, for each resample, ``mean(base[idx]) - mean(aligned[idx])``; the reported bounds are the
    ``(1-confidence)/2`` and ``(1+confidence)/2`` percentiles. Resampling pairs (not the two score lists
    independently) keeps the per-example correlation between the models, which makes the interval much
    tighter than an unpaired one. The result is deterministic for a given ``seed``.

    With fewer than :data:`MIN_RELIABLE_N` (30) examples a ``UserWarning`` says the interval is unreliable
    (and ``str(report)`` says so too). The report's text gives the tax as a percentage of the base score
    only when the base score is positive.

    Raises:
        ValueError: the score lists differ in length, are empty, not 1-D, or contain non-finite values;
            ``n_bootstrap`` is not a positive int; ``confidence`` is not in (0, 1).
    """
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable, got {type(evaluate).__name__}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, numbers.Integral) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be a positive int, got {n_bootstrap!r}")
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, numbers.Real)
        or not (0.0 < float(confidence) < 1.0)
    ):
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}")
    b = _scores(evaluate(base), "base")
    a = _scores(evaluate(aligned), "aligned")
    if b.shape != a.shape:
        raise ValueError(
            f"evaluate() returned {b.size} scores for base but {a.size} for aligned; "
            f"both must score the same examples in the same order"
        )
    n = b.size
    if n < MIN_RELIABLE_N:
        warnings.warn(
            f"measure_alignment_tax: only n={n} examples; below {MIN_RELIABLE_N} the bootstrap interval is "
            f"unreliable (too narrow, possibly zero-width). Score more examples.", UserWarning, stacklevel=2)
    diff = b - a
    rng = np.random.default_rng(seed)
    taxes = np.empty(int(n_bootstrap), dtype=np.float64)
    # Resample in chunks so the index matrix stays small (~4M entries) whatever n is.
    rows = max(1, min(int(n_bootstrap), (1 << 22) // n))
    for start in range(0, int(n_bootstrap), rows):
        stop = min(int(n_bootstrap), start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        taxes[start:stop] = diff[idx].mean(axis=1)
    alpha = (1.0 - float(confidence)) / 2.0
    lo, hi = np.quantile(taxes, [alpha, 1.0 - alpha])
    base_score, aligned_score = float(b.mean()), float(a.mean())
    return TaxReport(
        base_score=base_score,
        aligned_score=aligned_score,
        tax=base_score - aligned_score,
        ci_low=float(lo),
        ci_high=float(hi),
        n=int(n),
        confidence=float(confidence),
    )
