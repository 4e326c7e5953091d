"""The import path of the former one-file projection benchmark, kept for code written against it
(``atax_kernels.bench.core.main``, ``.FLOOR``, ``.Case``, ...). The benchmark itself lives in :mod:`.cases`
(workloads), :mod:`.impls` (implementations, correctness), :mod:`.timing`, :mod:`.memory`, :mod:`.report`,
:mod:`.project` (the ``project`` subcommand) and :mod:`.cli` (the subcommand dispatch); new code imports those."""

from .env import environment
from .baselines import foreach_project_, seed_project_
from .cases import DTYPES, GPT2_SMALL_NUMEL, Case, gpt2_small_shapes, make_data
from .cli import SUBCOMMANDS, main, top_parser
from .impls import (FLOOR, FOREACH, SEED, TOLERANCE, atax_name, default_backends, impl_by_name, implementations,
                    rel_err)
from .memory import measure_memory, memory_child, run_memory_child
from .project import bench_case, build_parser
from .report import format_tables, markdown_report
from .timing import StreamFloor, Timer, floor_numel

__all__ = ["DTYPES", "FLOOR", "FOREACH", "GPT2_SMALL_NUMEL", "SEED", "SUBCOMMANDS", "TOLERANCE", "Case", "StreamFloor",
           "Timer", "atax_name", "bench_case", "build_parser", "default_backends", "environment", "floor_numel",
           "foreach_project_", "format_tables", "gpt2_small_shapes", "impl_by_name", "implementations", "main",
           "make_data", "markdown_report", "measure_memory", "memory_child", "rel_err", "run_memory_child",
           "seed_project_", "top_parser"]
