"""``python -m atax_kernels.bench [project|remove-span|optimizer] [flags]``: the subcommand table, the top-level
``--help`` and the dispatch to each subcommand's own module and parser (no subcommand: ``project``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

#: ``python -m atax_kernels.bench <subcommand>``: name -> (module in this package, one-line description).
SUBCOMMANDS = {
    "project": ("project", "project_ (gradient space) vs the seed reference (torch.cat), stock torch._foreach and the "
                        "stream floor, on GPT-2-small-shaped gradient lists (the default when no subcommand is given)"),
    "remove-span": ("remove_span", "ops.remove_span_ (activation space) vs two torch.matmul per module vs the "
                                   "roofline, on GPT-2-small and Llama-7B module shapes"),
    "optimizer": ("optimizer", "ProjectedOptimizer's own cost per step vs project_ alone and a plain AdamW step, "
                               "and its peak extra memory"),
}


def top_parser() -> argparse.ArgumentParser:
    """The ``python -m atax_kernels.bench --help`` page: the subcommands (each has its own ``--help``)."""
    p = argparse.ArgumentParser(
        prog="python -m atax_kernels.bench",
        description="The atax_kernels benchmarks. Every list-valued flag takes a comma-separated list "
        "(--dtype fp32,bf16). Without a subcommand, the flags go to `project` (so `python -m atax_kernels.bench "
        "--quick` is `python -m atax_kernels.bench project --quick`).",
        epilog="`python -m atax_kernels.bench <subcommand> --help` lists a subcommand's flags. Results and how to "
        "read them: bench/README.md.",
    )
    sub = p.add_subparsers(dest="command", title="subcommands", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (_, text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m atax_kernels.bench [project|remove-span|optimizer] [flags]`` (no subcommand: ``project``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        top_parser().print_help()
        return 0
    if argv and argv[0] in SUBCOMMANDS:
        name, argv = argv[0], argv[1:]
    elif argv and not argv[0].startswith("-"):
        top_parser().error(f"unknown subcommand {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
    else:
        name = "project"
    # looked up at call time (each subcommand has its own module and parser; importing one loads only it)
    module = importlib.import_module(f".{SUBCOMMANDS[name][0]}", __package__)
    return module.main(argv)
