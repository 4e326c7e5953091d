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

from .metrics import distinct_n, expected_calibration_error, mean_entropy
from .rate import TaxRate, tax_rate
from .report import MIN_RELIABLE_N, TaxReport, measure_alignment_tax

__all__ = [
    "TaxReport",
    "measure_alignment_tax",
    "expected_calibration_error",
    "mean_entropy",
    "distinct_n",
    "TaxRate",
    "tax_rate",
]
