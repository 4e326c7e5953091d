"""``python -m atax_kernels.bench project`` (the default subcommand): ``project_`` in gradient space against the
seed reference (torch.cat), stock ``torch._foreach`` ops and the stream floor on GPT-2-small-shaped gradient
lists: every implementation timed side by side on one case (:func:`bench_case`), then the command line."""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from typing import Sequence

import torch
from torch import Tensor

from ._cli import add_device_flag, add_dtype_flag, add_report_flags, add_threads_flag, csv, progress_bar
from .env import environment, is_cuda
from .cases import DTYPES, GPT2_SMALL_NUMEL, Case, gpt2_small_shapes, make_data
from .impls import FLOOR, SEED, TOLERANCE, default_backends, implementations, rel_err
from .memory import measure_memory, memory_child
from .report import format_tables, markdown_report
from .timing import StreamFloor, Timer, floor_numel


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@torch.no_grad()
def bench_case(
    case: Case,
    backends: Sequence[str],
    repeat: int,
    warmup: int,
    check: bool = True,
    progress=None,
) -> list[dict]:
    """Times every implementation on one case, side by side, interleaved round-robin, plus the stream floor."""
    grads, refs = make_data(case)
    pristine = [g.clone() for g in grads]
    impls = implementations(backends, case.k)
    timer = Timer(case.device)
    floor = StreamFloor(floor_numel(case), case.device)

    def restore():
        torch._foreach_copy_(grads, pristine)

    recs: dict[str, dict] = {}
    seed_out: list[Tensor] | None = None
    tol = TOLERANCE[case.dtype]
    live: list[str] = []
    # One untimed correctness run per implementation (also its first warm-up), then --warmup more.
    for name, fn in impls.items():
        rec = recs[name] = {"impl": name, "times_ms": [], "error": None, "rel_err": None, "ok": None}
        try:
            restore()
            fn(grads, refs)
            if is_cuda(case.device):
                torch.cuda.synchronize()
            if name == SEED:
                seed_out = [g.clone() for g in grads]
                rec["rel_err"], rec["ok"] = 0.0, True
            elif check and seed_out is not None:
                e = rel_err(grads, seed_out)
                rec["rel_err"], rec["ok"] = e, bool(e <= tol)
            for _ in range(warmup):
                restore()
                fn(grads, refs)
            live.append(name)
        except Exception as exc:  # a broken backend must not take the whole run down
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if progress is not None:
            progress.update(1)
    for _ in range(max(1, warmup)):
        floor()
    floor_ms: list[float] = []
    # Round-robin repeats so that drift of a shared, noisy machine hits every implementation alike; the
    # floor is probed before every implementation (and once more per round), so its median tracks the same
    # conditions and its spread shows how noisy the machine was.
    for _ in range(repeat):
        for name in live:
            floor_ms.append(timer(floor))
            restore()
            recs[name]["times_ms"].append(timer(lambda: impls[name](grads, refs)))
        floor_ms.append(timer(floor))
    if progress is not None:
        progress.update(len(impls))

    bw = floor.bytes_per_call / (_median(floor_ms) * 1e-3)  # bytes/s
    bw_lo, bw_hi = floor.bytes_per_call / (max(floor_ms) * 1e-3), floor.bytes_per_call / (min(floor_ms) * 1e-3)
    traffic = case.min_traffic_bytes
    floor_time_ms = traffic / bw * 1e3
    base = {
        "case": case.name,
        "model": case.model,
        "dtype": case.dtype,
        "k": case.k,
        "scale": case.scale,
        "device": case.device,
        "numel": case.numel,
        "n_tensors": case.n_tensors,
        "min_traffic_bytes": traffic,
        "floor_bandwidth_gbps": bw / 1e9,
        "floor_bandwidth_gbps_range": [bw_lo / 1e9, bw_hi / 1e9],
        "floor_probes": len(floor_ms),
        "floor_ms": floor_time_ms,
        "tolerance": tol,
    }
    out = []
    seed_ms = _median(recs[SEED]["times_ms"]) if recs[SEED]["times_ms"] else float("nan")
    for name in impls:
        r = recs[name]
        med = _median(r["times_ms"])
        out.append(
            {
                **base,
                **r,
                "median_ms": med,
                "min_ms": min(r["times_ms"]) if r["times_ms"] else float("nan"),
                "gbps": traffic / (med * 1e-3) / 1e9 if r["times_ms"] else float("nan"),
                "x_floor": med / floor_time_ms if r["times_ms"] else float("nan"),
                "speedup_vs_seed": seed_ms / med if r["times_ms"] else float("nan"),
            }
        )
    out.append(
        {
            **base,
            "impl": FLOOR,
            "times_ms": [t * (traffic / floor.bytes_per_call) for t in floor_ms],
            "probe_times_ms": floor_ms,
            "probe": "a.copy_(b) fp32" if floor.cuda else "torch.add(b, c, out=a) fp32",
            "probe_numel": floor.a.numel(),
            "error": None,
            "rel_err": None,
            "ok": None,
            "median_ms": floor_time_ms,
            "min_ms": float("nan"),
            "gbps": bw / 1e9,
            "x_floor": 1.0,
            "speedup_vs_seed": seed_ms / floor_time_ms,
        }
    )
    del grads, refs, pristine, seed_out, floor
    gc.collect()
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``project`` subcommand's flags."""
    p = argparse.ArgumentParser(
        prog="python -m atax_kernels.bench project",
        description="Benchmark atax_kernels.project_ against the seed reference, stock foreach and the stream floor "
        "on GPT-2-small-shaped gradient lists. List-valued flags take comma-separated lists.",
    )
    p.add_argument("--scale", type=float, default=None, help="fraction of GPT-2 small (default 1.0; --quick 0.01)")
    add_dtype_flag(p)
    p.add_argument("--k", default="1,4", help="comma list of reference counts (default 1,4)")
    add_device_flag(p)
    p.add_argument("--backends", default=None, help="comma list of atax backends (default: available for the device)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per implementation (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs after the check run, >= 1 (default 2; --quick 1)")
    add_threads_flag(p)
    add_report_flags(p, json_help="write the raw records (and environment) as JSON",
                     markdown_help="write a markdown report (environment header + tables)")
    p.add_argument("--quick", action="store_true", help="small run: scale 0.01, repeat 3, warmup 1 (< 60 s on 2 cores)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-jobs", type=int, default=None, help="memory subprocesses in parallel (default 2 on CPU)")
    p.add_argument(
        "--memory-isolation",
        choices=["case", "impl"],
        default=None,
        help="fresh process per (case, implementation) (default, exact) or one per implementation for all cases "
        "(faster, may undercount later cases: freed heap pages are reused)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the correctness comparison with the seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str]) -> int:
    """The ``project`` benchmark (``python -m atax_kernels.bench project``)."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    scale = args.scale if args.scale is not None else (0.01 if args.quick else 1.0)
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if repeat < 1 or warmup < 1:
        # warmup 0 would time first-call costs (allocator, dispatch caches, page faults) as kernel time.
        raise SystemExit("--repeat must be >= 1 and --warmup >= 1")
    dtypes = csv(args.dtype)
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    ks = [int(k) for k in csv(args.k)]
    if any(k < 1 for k in ks):
        raise SystemExit("--k values must be >= 1")
    if is_cuda(args.device) and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    backends = csv(args.backends) if args.backends else default_backends(args.device)

    t0 = time.perf_counter()
    cases = [Case("gpt2-small", d, k, scale, args.device) for d in dtypes for k in ks]
    c0 = cases[0]
    print(
        f"GPT-2 small: {GPT2_SMALL_NUMEL:,} parameters in {len(gpt2_small_shapes())} tensors; "
        f"scale {scale:g} -> N = {c0.numel:,} in {c0.n_tensors} tensors",
        flush=True,
    )
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, atax backends: "
        f"{', '.join(backends) or '(none)'}; "
        f"repeat {repeat}, warmup {warmup}",
        flush=True,
    )
    n_impls = 2 + len(backends)
    bar = progress_bar(len(cases) * 2 * n_impls, "timing (cases x implementations)", args.no_progress)
    records: list[dict] = []
    for case in cases:
        bar.set_description(f"timing {case.name}")
        records += bench_case(case, backends, repeat, warmup, check=not args.no_check, progress=bar)
    bar.close()
    t_timing = time.perf_counter() - t0
    if not args.no_memory:
        if is_cuda(args.device):
            jobs = 1
        else:
            jobs = args.memory_jobs if args.memory_jobs is not None else min(2, os.cpu_count() or 1)
            if args.memory_jobs is None and jobs > 1:
                # Two children at once only if two worst cases (grads + refs + ~12 copies for the seed) fit.
                worst = max((1 + c.k) * c.numel * c.elem_size + 12 * c.numel * c.elem_size for c in cases)
                try:
                    import psutil

                    avail = psutil.virtual_memory().available
                except Exception:
                    avail = 0
                if 2 * worst > 0.6 * avail:
                    jobs = 1
        per_case = args.memory_isolation != "impl"
        mem_cases = [c for c in cases if c.dtype == dtypes[0]] if args.quick else cases
        if args.quick and len(mem_cases) < len(cases):
            print(f"--quick: peak memory measured for the {dtypes[0]} cases only", flush=True)
        names = {c.name for c in mem_cases}
        measure_memory(
            [r for r in records if r["case"] in names],
            {c.name: c for c in mem_cases},
            jobs,
            args.no_progress,
            per_case=per_case,
        )
    t_mem = time.perf_counter() - t0 - t_timing
    wall = time.perf_counter() - t0
    print()
    print(format_tables(records), end="")
    print(f"\nwall time {wall:.1f} s (timing {t_timing:.1f} s, memory {t_mem:.1f} s)")
    bad = [r for r in records if r.get("ok") is False]
    if bad:
        print("MISMATCH vs seed: " + ", ".join(f"{r['impl']} on {r['case']}" for r in bad))
    env = environment(args.device, argv)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": env, "wall_s": wall, "records": records}, f, indent=1, default=str)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(markdown_report(env, records, wall))
    return 1 if bad else 0
