"""Calibration and diversity beside the tax: expected calibration error, mean entropy, distinct-n."""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["expected_calibration_error", "mean_entropy", "distinct_n"]


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
