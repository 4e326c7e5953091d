"""``ProjectedOptimizer`` (optimizer.py: delegation and orchestration of a step), its constructor checks
(settings.py) and its checkpoints (checkpoint.py)."""
from __future__ import annotations

from .optimizer import NO_REFERENCES, ProjectedOptimizer
from .settings import REFERENCE_KINDS, TARGETS

__all__ = ["ProjectedOptimizer", "TARGETS", "REFERENCE_KINDS", "NO_REFERENCES"]
