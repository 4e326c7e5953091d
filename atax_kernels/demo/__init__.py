"""End-to-end alignment-tax demo on two tiny tasks, scored on held-out data: ``python -m atax_kernels.demo``.

Each task (``atax_kernels.tasks``) pretrains a tiny random-init Llama to ~100 % on a capability, then
safety-tunes it. ``modular``: refuse prompts led by a MARKER token (a token trigger). ``overflow``: refuse the
sums that wrap around mod 23 (a semantic trigger: both sides share every token). Every method trains only on
the tasks' ``*_train`` splits (PTX batches, KL prompts, reference gradients and activation bases draw from
``capability_train``); every score is on the held-out ``*_eval`` splits, with the train-split score beside it.

Methods, each at several learning rates (``extra fwd/bwd`` = extra forward/backward passes per step in units
of one training batch, the matched-compute axis):

* ``plain``: AdamW on the safety loss (0 / 0);
* ``ptx λ``: plus λ x the capability loss on a capability_train batch (1 / 1);
* ``kl 0.5``: plus 0.5 x KL(policy || base) on the safety prompts (1 / 0);
* ``interp α``: weight interpolation of the plain run towards the base (0 / 0);
* ``grad: loss ref``: ``ProjectedOptimizer`` against one capability-loss gradient (1 / 1);
* ``grad: 4 tempered (update)``: 4 tempered-CE references (T = 30), update projection (4 / 4);
* ``act e<E> c<β>``: :class:`~atax_kernels.ActivationSubspace` bases of capability_train's layer inputs
  (energy E, contrast β), every Linear's AdamW update projected off them, refreshed every 10 steps (one
  no-grad forward of capability_train: ~0.2 / 0); ``+ ptx 1.0`` adds the PTX term (1.2 / 1).

``--full`` adds ``grad: conflict`` and ``grad: tempered + ptx 0.1`` and runs 3 seeds (split seed and
fine-tuning seed), reporting mean ± std. Seeded and deterministic (rows do not depend on ``--jobs``).
"""
from __future__ import annotations

from .cli import build_parser, main
from .methods import DEFAULT_LRS, INTERP_ALPHAS, QUICK_LRS, Method, methods
from .plot import FAMILY_COLOURS, LOW_SAFETY, RECOMMENDED, colour_family, figure, method_style, plot, seeds_note
from .report import LEGEND, aggregate, format_summary, format_table, markdown_report, run_info
from .training import base_model, evaluate_row, run

__all__ = ["DEFAULT_LRS", "FAMILY_COLOURS", "INTERP_ALPHAS", "LEGEND", "LOW_SAFETY", "Method", "QUICK_LRS",
           "RECOMMENDED", "aggregate", "base_model", "build_parser", "colour_family", "evaluate_row", "figure",
           "format_summary", "format_table", "main", "markdown_report", "method_style", "methods", "plot", "run",
           "run_info", "seeds_note"]
