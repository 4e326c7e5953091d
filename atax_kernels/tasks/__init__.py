"""Small, fast alignment-tax tasks for tests and demos.

:mod:`atax_kernels.tasks.modular`: a tiny Llama learns ``a + b mod 23`` (the capability), then safety
fine-tuning teaches it to answer REFUSE when a MARKER token opens the prompt — and, done naively, to
refuse (or forget) the unmarked sums too: the alignment tax. Needs ``transformers``.
"""
from __future__ import annotations

__all__ = ["modular"]
