"""Command-line pieces the bench subcommands share: comma-separated list flags, the flags spelled the same in
every subcommand (so ``--device``, ``--dtype``, ``--threads``, ``--json`` and ``--markdown`` mean one thing), and
the progress bar on stderr."""

from __future__ import annotations

import argparse
import sys


def csv(text: str) -> list[str]:
    """The items of a comma-separated list flag, stripped, empty items dropped."""
    return [x.strip() for x in text.split(",") if x.strip()]


def add_device_flag(p: argparse.ArgumentParser) -> None:
    """``--device``: where the benchmark runs."""
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")


def add_dtype_flag(p: argparse.ArgumentParser) -> None:
    """``--dtype``: the comma-separated dtypes to run."""
    p.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32,bf16,fp16 (default fp32,bf16)")


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    """``--threads``: torch intra-op threads."""
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")


def add_report_flags(p: argparse.ArgumentParser, *, json_help: str, markdown_help: str) -> None:
    """``--json PATH`` and ``--markdown PATH``, the two report files every subcommand can write."""
    p.add_argument("--json", metavar="PATH", help=json_help)
    p.add_argument("--markdown", metavar="PATH", help=markdown_help)


class _NoProgress:
    def update(self, n=1): ...
    def set_description(self, d): ...
    def close(self): ...


def progress_bar(total: int, desc: str, disable: bool):
    """A tqdm bar on stderr (or a stand-in that does nothing where tqdm is missing)."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, disable=disable, leave=False, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        return _NoProgress()
