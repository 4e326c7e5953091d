"""Wrapped vs plain optimizer step on the GPT-2-small-shaped parameter list.

``python -m atax_kernels.bench optimizer [--scale F] [--repeat R] [--markdown PATH]`` (or
``python -m atax_kernels.bench.optimizer``)

Times, interleaved in one process: a plain AdamW step, ``project_`` alone (one live reference), a
``ProjectedOptimizer`` AdamW step (capture + project + step), and the same wrapper around a no-op optimizer (its
own work alone). Reports the wrapper's overhead as a multiple of the ``project_`` time (target: <= 1.2x), both
directly (no-op inner step) and as wrapped minus plain AdamW step, and the peak extra memory of each step measured in a
fresh process (peak RSS growth during ``step()``), as a percentage of one gradient copy (target: <= 1 %).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Sequence

import torch

from .env import environment, proc_status, reset_peak_rss
from .cases import gpt2_small_shapes


def _params(scale: float, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02) for _, shape in gpt2_small_shapes(scale)]


def _fill_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3


class _NoOpOptimizer(torch.optim.Optimizer):
    """An inner optimizer whose step does nothing: wrapping it times the wrapper's own work alone."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def _make(kind: str, params, backend: str | None):
    from atax_kernels import ProjectedOptimizer

    if kind == "wrapped-noop":
        return ProjectedOptimizer(_NoOpOptimizer(params), backend=backend)
    inner = torch.optim.AdamW(params, lr=1e-4)
    return inner if kind == "plain" else ProjectedOptimizer(inner, backend=backend)


def _prepare_grads(kind: str, opt, params, seed: int) -> None:
    """The gradients of one step; a wrapped optimizer first captures a reference from other gradients."""
    if kind.startswith("wrapped"):
        _fill_grads(params, seed + 1000)
        opt.capture_reference()
    _fill_grads(params, seed)


def memory_child(kind: str, scale: float, backend: str | None) -> dict:
    """Peak RSS growth during one step (after a warm-up step so optimizer state exists)."""
    params = _params(scale)
    opt = _make(kind, params, backend)
    _prepare_grads(kind, opt, params, 0)
    opt.step()
    _prepare_grads(kind, opt, params, 1)
    before = proc_status()["VmRSS"]
    ok = reset_peak_rss()
    opt.step()
    peak = proc_status()["VmHWM"]
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    return {"kind": kind, "peak_extra_bytes": max(peak - before, 0) if ok else None, "grad_bytes": grad_bytes}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m atax_kernels.bench optimizer [flags]``: time the four steps, measure memory, print the report."""
    ap = argparse.ArgumentParser(prog="python -m atax_kernels.bench optimizer", description=__doc__.split("\n")[0]
                                 + " (also `python -m atax_kernels.bench.optimizer`).")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="fraction of the GPT-2-small parameter count (default 1.0, 124 M parameters)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved timed rounds (default 5); medians and minima")
    ap.add_argument("--backend", default=None,
                    help="atax backend for project_ (torch, cpu, cuda, triton; default: the registry's pick)")
    ap.add_argument("--markdown", default=None, metavar="PATH", help="write the markdown report")
    ap.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.scale, args.backend)))
        return 0

    import atax_kernels

    params = _params(args.scale)
    n = sum(p.numel() for p in params)
    plain = _make("plain", params, args.backend)
    wrapped = _make("wrapped", [torch.nn.Parameter(p.detach().clone()) for p in params], args.backend)
    wparams = [p for g in wrapped.param_groups for p in g["params"]]
    noop = _make("wrapped-noop", [torch.nn.Parameter(p.detach().clone()) for p in params], args.backend)
    nparams = [p for g in noop.param_groups for p in g["params"]]
    grads = [torch.randn_like(p) for p in params]
    ref = [torch.randn_like(p) for p in params]
    times: dict[str, list[float]] = {"plain AdamW step": [], "project_ alone": [], "wrapped AdamW step": [],
                                     "wrapped no-op step": []}

    def time_step(kind, opt, step_params):
        """A runner that fills the gradients of round ``r`` (untimed), then times one ``opt.step()``."""
        def run(r):
            _prepare_grads(kind, opt, step_params, r)
            t0 = time.perf_counter()
            opt.step()
            return time.perf_counter() - t0
        return run

    def time_project(r):
        t0 = time.perf_counter()
        atax_kernels.project_(grads, ref, backend=args.backend)
        return time.perf_counter() - t0

    runners = {"plain AdamW step": time_step("plain", plain, params), "project_ alone": time_project,
               "wrapped AdamW step": time_step("wrapped", wrapped, wparams),
               "wrapped no-op step": time_step("wrapped-noop", noop, nparams)}
    order = list(runners)
    for r in range(args.repeat + 1):
        # Rotate the order every round so no implementation always follows the same one (cache/allocator state).
        for name in order[r % len(order):] + order[:r % len(order)]:
            t = runners[name](r)
            if r:  # the first round builds optimizer state
                times[name].append(t)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    best = {k: min(v) * 1e3 for k, v in times.items()}
    # Minimum over repeats: the machine is shared and a single disturbed round moves a median of few repeats.
    overhead = (best["wrapped AdamW step"] - best["plain AdamW step"]) / best["project_ alone"]
    # The wrapper's own cost without the inner step: AdamW's per-parameter temporaries page-fault fresh memory
    # on this VM, so its step time swings by hundreds of ms and a difference of two AdamW timings is noisy.
    own = {"median": med["wrapped no-op step"] / med["project_ alone"],
           "min": best["wrapped no-op step"] / best["project_ alone"]}

    mem = {}
    for kind in ("plain", "wrapped"):
        cmd = [sys.executable, "-m", "atax_kernels.bench.optimizer", "--_memory-child", kind, "--scale", str(args.scale)]
        if args.backend:
            cmd += ["--backend", args.backend]
        # A fixed mmap threshold makes glibc return every large block to the OS on free, so peak RSS tracks
        # live tensors; with its dynamic threshold, reuse of freed blocks differs between the two runs and
        # shows up as tens of MB of allocator noise.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        mem[kind] = json.loads(out)
    grad_bytes = mem["plain"]["grad_bytes"]
    extra = None
    if mem["plain"]["peak_extra_bytes"] is not None and mem["wrapped"]["peak_extra_bytes"] is not None:
        extra = mem["wrapped"]["peak_extra_bytes"] - mem["plain"]["peak_extra_bytes"]

    env = environment("cpu", [])
    env["command"] = "python -m atax_kernels.bench.optimizer " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [f"- {k}: {v}" for k, v in env.items() if isinstance(v, (str, int, float))]
    lines = header + ["", f"N = {n:,} parameters (fp32) in {len(params)} tensors, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, median of {args.repeat}", "",
             "| step | median ms | min ms |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {best[k]:.1f} |" for k, v in med.items()]
    lines += ["", f"wrapper's own cost (wrapped step around a no-op optimizer) = {own['median']:.2f}x the project_ "
                  f"time by medians, {own['min']:.2f}x by minima (target <= 1.2x)",
              f"wrapped minus plain AdamW step (minimum times) = {overhead:.2f}x the project_ time "
              f"(includes AdamW's run-to-run swing)"]
    for kind in ("plain", "wrapped"):
        b = mem[kind]["peak_extra_bytes"]
        lines.append(f"peak RSS growth during {kind} step: "
                     + ("n/a" if b is None else f"{b / 2**20:.1f} MB ({100 * b / grad_bytes:.2f} % of one gradient)"))
    if extra is not None:
        lines.append(f"wrapped minus plain: {extra / 2**20:.1f} MB = {100 * extra / grad_bytes:.2f} % of one gradient "
                     f"(target <= 1 %)")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
