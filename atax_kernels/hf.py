"""Shortcut: ``from atax_kernels.hf import attach`` (see :mod:`atax_kernels.integrations.hf`)."""
from __future__ import annotations

from .integrations.hf import EMA, AtaxHandle, CapabilitySource, attach

__all__ = ["attach", "EMA", "CapabilitySource", "AtaxHandle"]
