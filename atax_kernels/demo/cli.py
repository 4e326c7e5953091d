"""``python -m atax_kernels.demo``'s command line: train the rows (or re-render saved ones), print the tables,
write JSON, markdown and the figure."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Sequence

from .. import tasks as _tasks
from .plot import plot
from .report import LEGEND, format_summary, format_table, markdown_report, run_info
from .training import run

#: The first line of the package's docstring: the ``--help`` description.
DESCRIPTION = "End-to-end alignment-tax demo on two tiny tasks, scored on held-out data: ``python -m atax_kernels.demo``."


def _csv(kind: Callable[[str], Any], choices: Sequence[str] | None = None) -> Callable[[str], list[Any]]:
    """argparse type of a comma-separated list (the convention of every list flag here and in the bench)."""
    def parse(text: str) -> list[Any]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
        try:
            out = [kind(x) for x in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
        bad = [x for x in out if choices is not None and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return out
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line. Times are measured on a 2-core AMD EPYC (docs/demo.md, docs/demo-full.md)."""
    ap = argparse.ArgumentParser(
        prog="python -m atax_kernels.demo", description=DESCRIPTION,
        epilog="Time on 2 CPU cores: the default run (both tasks, 1 seed, 300 steps, 3 learning rates) ~3 min "
        "(161 s measured), plus ~4 min on a fresh clone to set up the venv, build the extension and pretrain the "
        "two base models (cached under ~/.cache/atax_kernels or $ATAX_CACHE_DIR); --full ~11 min (684 s measured). "
        "List-valued flags take comma-separated lists (--seeds 0,1,2).")
    ap.add_argument("--quick", action="store_true",
                    help="CI size: 6 methods, 120 steps, learning rates 3e-4,1e-3 (a fraction of the default run)")
    ap.add_argument("--full", action="store_true",
                    help="the seeds study: seeds 0,1,2 and two more gradient variants (~11 min on 2 cores)")
    ap.add_argument("--seeds", type=_csv(int), default=None, metavar="S,S,...",
                    help="split + fine-tuning seeds, comma-separated (default 0; --full: 0,1,2)")
    ap.add_argument("--tasks", type=_csv(str, _tasks.TASKS), default=None, metavar="T,T,...",
                    help=f"only these tasks, comma-separated, from {','.join(_tasks.TASKS)} (default: both)")
    ap.add_argument("--task", dest="task_old", choices=_tasks.TASKS, action="append", default=None,
                    help=argparse.SUPPRESS)  # the old repeatable spelling of --tasks, still accepted
    ap.add_argument("--steps", type=int, default=None,
                    help="safety fine-tuning steps per run (default 300; --quick 120)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the rows (and the run's machine, commit, "
                    "command and wall time) as JSON, re-renderable with --from-json")
    ap.add_argument("--markdown", default=None, metavar="PATH", help="write the report as markdown")
    ap.add_argument("--plot", default=None, metavar="PATH", help="write the figure as PNG")
    ap.add_argument("--jobs", type=int, default=None,
                    help="worker processes training runs side by side (default: up to 2); rows do not depend on it")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--from-json", default=None, metavar="ROWS",
                    help="train nothing: re-render the tables/plot from rows a previous run wrote with --json")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m atax_kernels.demo [flags]``: see :func:`build_parser`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick and args.full:
        ap.error("--quick and --full exclude each other")
    if args.task_old:  # the old repeatable --task NAME
        args.tasks = (args.tasks or []) + args.task_old
    t0 = time.perf_counter()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        rows, info = (saved.get("rows"), saved.get("run")) if isinstance(saved, dict) else (None, None)
        if not isinstance(rows, list) or not rows or not isinstance(info, dict) \
                or not all(isinstance(r, dict) and "task" in r for r in rows):
            ap.error(f"--from-json {args.from_json}: expected {{'run': ..., 'rows': [...]}} as written by --json")
        info = dict(info, rendered_by=f"python -m atax_kernels.demo {' '.join(argv)}")
    else:
        info = run_info(argv, 0.0)  # machine, date and commit as the run starts (the tree may move during it)
        rows = run(quick=args.quick, full=args.full, seeds=args.seeds, steps=args.steps, task_names=args.tasks,
                   progress=not args.no_progress, jobs=args.jobs)
        info["wall_s"] = time.perf_counter() - t0
    print(format_summary(rows))
    print(format_table(rows))
    print(LEGEND)
    print(f"\n{len(rows)} rows in {info['wall_s']:.1f} s")
    if args.json and not args.from_json:
        with open(args.json, "w") as f:
            json.dump({"run": info, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_report(rows, info))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    return 0
