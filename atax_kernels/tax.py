"""Measuring the alignment tax: paired score differences, calibration/diversity metrics, and the
geometric "tax rate" between safety and capability gradient subspaces.

Public API::

    measure_alignment_tax(base, aligned, evaluate, *, n_bootstrap=1000, confidence=0.95, seed=0) -> TaxReport
    expected_calibration_error(probs_or_logits, labels, n_bins=15, *, from_logits=None) -> float
    mean_entropy(logits, *, mask=None) -> float
    distinct_n(token_ids, n) -> float
    tax_rate(safety_grads, capability_grads, *, rtol=None, backend=None) -> TaxRate

Everything here is measurement: no function modifies its inputs.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import _validate as V
from .ops import gram

__all__ = [
    "TaxReport",
    "measure_alignment_tax",
    "expected_calibration_error",
    "mean_entropy",
    "distinct_n",
    "TaxRate",
    "tax_rate",
]


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


# ---------------------------------------------------------------------------------------------------------
# Output-distribution metrics
# ---------------------------------------------------------------------------------------------------------


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a tensor or array-like, got {type(x).__name__} ({exc})") from None


_PROB_ATOL = 1e-3  # rows must sum to 1 within this to be read as probabilities (loose enough for fp16 softmax)


def expected_calibration_error(
    probs_or_logits: Any,
    labels: Any,
    n_bins: int = 15,
    *,
    from_logits: bool | None = None,
) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width confidence bins.

    ``ECE = sum_b |acc_b - conf_b| * count_b / N`` where, for each example, the prediction is the argmax
    class (first one on ties), the confidence its probability, and bin ``b`` holds the confidences in
    ``(b/n_bins, (b+1)/n_bins]`` (the first bin also holds 0). Empty bins contribute nothing.

    Detection rule (``from_logits=None``): the input is read as probabilities when every entry is finite
    and in ``[0, 1]`` and every row sums to 1 within ``1e-3``; otherwise it is read as logits and
    softmax-ed along the last dim. Logits that happen to look like probabilities (e.g. a row of one-hot
    logits) are misread, so pass ``from_logits=True`` / ``False`` whenever you know which it is. With
    ``from_logits=False`` the entries must be in ``[0, 1]`` (rows are not renormalised).

    Args:
        probs_or_logits: ``[N, C]`` probabilities or logits (tensor or array-like).
        labels: ``[N]`` integer class labels in ``[0, C)``.
        n_bins: number of equal-width bins (positive int).
        from_logits: force the interpretation (see above).

    Returns:
        ECE in ``[0, 1]`` as a Python float. Computed in float64 on CPU.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    if from_logits not in (None, True, False):
        raise ValueError(f"from_logits must be None, True or False, got {from_logits!r}")
    x = _as_tensor(probs_or_logits, "probs_or_logits")
    y = _as_tensor(labels, "labels")
    if x.ndim != 2:
        raise ValueError(f"probs_or_logits must be [N, C], got shape {tuple(x.shape)}")
    n, c = x.shape
    if n == 0 or c == 0:
        raise ValueError(f"probs_or_logits is empty (shape {tuple(x.shape)})")
    if not (x.dtype.is_floating_point or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"probs_or_logits has dtype {x.dtype}; expected a real (floating) dtype")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must be [N] = [{n}], got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"labels has dtype {y.dtype}; expected an integer dtype")
    x = x.to("cpu", torch.float64)
    y = y.to("cpu", torch.int64)
    if bool(((y < 0) | (y >= c)).any()):
        bad = int(torch.nonzero((y < 0) | (y >= c))[0, 0])
        raise ValueError(f"labels[{bad}] = {int(y[bad])} is outside [0, {c})")
    if torch.isnan(x).any():
        raise ValueError("probs_or_logits contains NaN")
    in_range = bool(((x >= 0) & (x <= 1)).all())
    if from_logits is None:
        from_logits = not (in_range and bool(((x.sum(dim=1) - 1).abs() <= _PROB_ATOL).all()))
    if from_logits:
        probs = torch.softmax(x, dim=1)
        if torch.isnan(probs).any():
            raise ValueError("softmax of the logits is NaN (a row of +inf or all -inf logits?)")
    else:
        if not in_range:
            raise ValueError("from_logits=False but probs_or_logits has entries outside [0, 1]")
        probs = x
    conf, pred = probs.max(dim=1)
    correct = (pred == y).to(torch.float64)
    upper = torch.linspace(0.0, 1.0, int(n_bins) + 1, dtype=torch.float64)[1:]
    upper[-1] = 1.0
    # bucketize(right=False): index i with upper[i-1] < conf <= upper[i], i.e. bins (lo, hi]; 0 -> bin 0.
    bins = torch.bucketize(conf, upper, right=False).clamp_(max=int(n_bins) - 1)
    count = torch.bincount(bins, minlength=int(n_bins)).to(torch.float64)
    sum_conf = torch.bincount(bins, weights=conf, minlength=int(n_bins))
    sum_acc = torch.bincount(bins, weights=correct, minlength=int(n_bins))
    # sum_b |acc_b - conf_b| * count_b / N  ==  sum_b |sum_acc_b - sum_conf_b| / N
    return float((sum_acc - sum_conf).abs().sum() / n)


def mean_entropy(logits: Any, *, mask: Any = None) -> float:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` along the last dim.

    Args:
        logits: ``[..., C]`` logits (at least 1-D; a 1-D input is one position). ``-inf`` logits are allowed
            (zero-probability classes contribute 0); NaN or a row with no finite logit gives NaN.
        mask: optional boolean tensor of shape ``logits.shape[:-1]``; only positions where it is True are
            averaged (e.g. the attention mask of generated tokens).

    Returns:
        The mean entropy as a Python float (computed in float32 or better, accumulated in float64, in
        row chunks so large-vocabulary inputs never need a full float64 copy).
    """
    x = _as_tensor(logits, "logits")
    if x.ndim == 0:
        raise ValueError("logits must have at least one dim (the class dim)")
    if not x.dtype.is_floating_point:
        raise TypeError(f"logits has dtype {x.dtype}; expected a floating dtype")
    c = x.shape[-1]
    lead = tuple(x.shape[:-1])
    if c == 0:
        raise ValueError(f"logits has an empty class dim (shape {tuple(x.shape)})")
    rows = x.reshape(-1, c)
    keep = None
    if mask is not None:
        m = _as_tensor(mask, "mask")
        if m.dtype != torch.bool:
            raise TypeError(f"mask has dtype {m.dtype}; expected torch.bool")
        if tuple(m.shape) != lead:
            raise ValueError(f"mask has shape {tuple(m.shape)} but logits.shape[:-1] is {lead}")
        keep = m.reshape(-1).to(rows.device)
    count = rows.shape[0] if keep is None else int(keep.sum())
    if count == 0:
        raise ValueError("no positions to average (empty logits or an all-False mask)")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    chunk = max(1, (1 << 24) // c)
    total = torch.zeros((), dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[0], chunk):
        block = rows[start:start + chunk]
        if keep is not None:
            block = block[keep[start:start + chunk]]
        lp = torch.log_softmax(block.to(work), dim=-1)
        p = lp.exp()
        plogp = torch.where(p > 0, p * lp, torch.zeros((), dtype=work, device=lp.device))
        total += (-plogp.sum(dim=-1)).to(torch.float64).sum()
    return float(total / count)


def distinct_n(token_ids: Any, n: int) -> float:
    """Distinct-n: the number of distinct n-grams divided by the total number of n-grams.

    n-grams are taken within each sequence (never across sequence boundaries) and counted over the whole
    batch. Every token counts, so strip padding / EOS fill before calling.

    Args:
        token_ids: a batch of sequences — a list of lists of ints, or a 2-D integer tensor/array (one row
            per sequence). A single flat list of ints is read as one sequence.
        n: n-gram order (positive int).

    Returns:
        A float in ``[0, 1]``; 0.0 when there is no n-gram at all (every sequence shorter than ``n``).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    n = int(n)
    if isinstance(token_ids, (torch.Tensor, np.ndarray)):
        arr = token_ids.detach().cpu().numpy() if isinstance(token_ids, torch.Tensor) else token_ids
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise ValueError(f"token_ids must be 2-D [batch, length], got shape {tuple(arr.shape)}")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"token_ids has dtype {arr.dtype}; expected integers")
        seqs: list[Sequence[int]] = arr.tolist()
    elif isinstance(token_ids, (list, tuple)):
        if len(token_ids) and all(isinstance(t, numbers.Integral) for t in token_ids):
            seqs = [list(token_ids)]
        else:
            seqs = []
            for i, s in enumerate(token_ids):
                if isinstance(s, torch.Tensor):
                    s = s.detach().cpu().reshape(-1).tolist()
                if not isinstance(s, (list, tuple)) or not all(isinstance(t, numbers.Integral) for t in s):
                    raise TypeError(f"token_ids[{i}] must be a sequence of ints")
                seqs.append(list(s))
    else:
        raise TypeError(f"token_ids must be a list of sequences or a 2-D tensor, got {type(token_ids).__name__}")
    seen: set[tuple[int, ...]] = set()
    total = 0
    for s in seqs:
        s = [int(t) for t in s]
        k = len(s) - n + 1
        if k <= 0:
            continue
        total += k
        seen.update(tuple(s[i:i + n]) for i in range(k))
    return len(seen) / total if total else 0.0


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
        out.append(V.as_tensor_list(lst, f"{name}[{j}]"))
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
    V.check_parallel(s[0], "safety_grads[0]", s[1:] + c, labels)
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
