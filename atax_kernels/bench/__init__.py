"""Benchmark CLI for atax_kernels: ``python -m atax_kernels.bench --quick``.

Compares, side by side in one process, the seed reference (torch.cat), stock ``torch._foreach`` ops, every
available atax backend and the stream floor on GPT-2-small-shaped gradient lists. See bench/README.md.
"""

from .baselines import foreach_project_, seed_project_
from .cases import Case, gpt2_small_shapes, make_data
from .cli import main

__all__ = ["Case", "foreach_project_", "gpt2_small_shapes", "main", "make_data", "seed_project_"]
