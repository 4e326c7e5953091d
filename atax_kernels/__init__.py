"""atax_kernels: fused gradient projection that lowers the alignment tax.

Before each optimizer step, remove from the safety gradient its component along capability gradients
(or a stored capability subspace), so safety is learned in directions that do not cost capability.

Public API::

    gram(vectors, *, per_tensor=False, backend=None) -> Tensor
    combine_(target, vectors, coefs, *, backend=None) -> None
    project_(grads, refs, *, mode="orthogonal", strength=1.0, granularity="global", backend=None)
        -> ProjectionStats
    available_backends() -> list[str]

Importing this package never compiles anything; the C++ extension builds on first use.
"""
from __future__ import annotations

from .ops import available_backends, combine_, gram
from .projection import ProjectionStats, project_
from .references.subspace import Subspace
from .optim import ProjectedOptimizer
from .activation import ActivationSubspace, RefreshSchedule
from .plain import project_model_
from . import objectives
from .interpolate import interpolate_
from .pareto import pareto_sweep
from .tax import TaxRate, TaxReport, distinct_n, expected_calibration_error, mean_entropy, measure_alignment_tax, tax_rate

__version__ = "0.1.0"

__all__ = ["gram", "combine_", "project_", "ProjectionStats", "available_backends", "Subspace",
           "ProjectedOptimizer", "ActivationSubspace", "RefreshSchedule", "project_model_", "objectives", "interpolate_", "pareto_sweep", "measure_alignment_tax", "TaxReport", "tax_rate",
           "TaxRate", "expected_calibration_error", "mean_entropy", "distinct_n", "__version__"]
