"""Shared benchmark machinery: GPT-2-small-shaped cases, implementations, timing, the stream floor,
peak-memory children, correctness check against the seed, and the table / markdown / JSON writers.

Used by ``python -m atax_kernels.bench`` (``main``) and by ``bench/test_bench_projection.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
from torch import Tensor

from .baselines import foreach_project_, seed_project_

# --------------------------------------------------------------------------------------------------------------
# The public API, or small stand-ins until it exists.
# --------------------------------------------------------------------------------------------------------------
try:  # pragma: no cover - depends on what has landed
    import atax_kernels as _atax

    _atax_project_ = _atax.project_
    _atax_available_backends = _atax.available_backends
    ATAX_STANDIN = False
except (ImportError, AttributeError):  # the lead's API is not there yet
    _atax = None
    ATAX_STANDIN = True

    def _atax_available_backends() -> list[str]:
        return ["standin"]

    @torch.no_grad()
    def _atax_project_(grads, refs, *, mode="orthogonal", strength=1.0, granularity="global", backend=None):
        """Stand-in: global orthogonal projection with foreach ops (float64 solve), no flattening."""
        if mode != "orthogonal" or granularity != "global":
            raise NotImplementedError("stand-in supports mode='orthogonal', granularity='global' only")
        R = [refs] if isinstance(refs[0], Tensor) else list(refs)
        vecs = [grads] + R
        m = len(vecs)
        M = torch.zeros((m, m), dtype=torch.float64, device=grads[0].device)
        for a in range(m):
            for b in range(a, m):
                s = sum(
                    torch.dot(x.reshape(-1).float(), y.reshape(-1).float()).double()
                    for x, y in zip(vecs[a], vecs[b])
                )
                M[a, b] = M[b, a] = s
        lam = torch.linalg.pinv(M[1:, 1:], hermitian=True) @ M[1:, 0]
        for j, c in enumerate((strength * lam).tolist()):
            if c != 0.0:
                torch._foreach_add_(grads, R[j], alpha=-c)
        return None


def atax_version() -> str:
    if _atax is None:
        return "stand-in (atax_kernels API not importable)"
    return str(getattr(_atax, "__version__", "unknown"))


# --------------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def gpt2_small_shapes(scale: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter shapes of GPT-2 small (HF layout, tied lm_head: 124,439,808 parameters in 148 tensors).

    ``scale`` < 1 shrinks the first dimension of every 2-D tensor (vocab rows, positions, and the input dim of
    every Conv1D weight) to ``max(1, round(rows * scale))``; 1-D tensors (biases, layer norms) keep their size.
    The tensor count (148) stays the same, so per-tensor overheads keep their weight; N scales ~linearly.
    """
    if not (0 < scale <= 1.0):
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    d, V, P, L = 768, 50257, 1024, 12

    def rows(r: int) -> int:
        return max(1, int(round(r * scale)))

    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("wte.weight", (rows(V), d)),
        ("wpe.weight", (rows(P), d)),
    ]
    for i in range(L):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (d,)),
            (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (rows(d), 3 * d)),
            (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (rows(d), d)),
            (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)),
            (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (rows(d), 4 * d)),
            (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (rows(4 * d), d)),
            (p + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


GPT2_SMALL_NUMEL = sum(math.prod(s) for _, s in gpt2_small_shapes(1.0))  # 124,439,808


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    dtype: str  # key of DTYPES
    k: int
    scale: float
    device: str

    @property
    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return gpt2_small_shapes(self.scale)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def min_traffic_bytes(self) -> int:
        # read g, write g, and (for the two passes) read g again; each reference read twice:
        # N * (3 s_g + 2 k s_r), the roofline in docs/DESIGN.md.
        s = self.elem_size
        return self.numel * (3 * s + 2 * self.k * s)

    @property
    def name(self) -> str:
        return f"{self.model} {self.dtype} k={self.k}"


def make_data(case: Case, seed: int = 0) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Gradients and k reference lists with a large component of g inside span(refs).

    g = noise + sum_j r_j (all i.i.d. N(0, 0.01^2) per element), so the orthogonal projection removes more than
    half of ||g||: an implementation that does nothing (or the wrong thing) fails the check against the seed.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype, dev = DTYPES[case.dtype], torch.device(case.device)
    grads: list[Tensor] = []
    refs: list[list[Tensor]] = [[] for _ in range(case.k)]
    for _, shape in case.shapes:
        g = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.01)
        for j in range(case.k):
            r = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.01)
            g.add_(r)
            refs[j].append(r.to(device=dev, dtype=dtype))
        grads.append(g.to(device=dev, dtype=dtype))
        del g
    return grads, refs


# --------------------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------------------
SEED = "seed (torch.cat)"
FOREACH = "stock foreach"
FLOOR = "stream floor"


def atax_name(backend: str) -> str:
    return f"atax[{backend}]"


def _atax_impl(backend: str, k: int) -> Callable[[list[Tensor], list[list[Tensor]]], None]:
    def run(grads: list[Tensor], refs: list[list[Tensor]]) -> None:
        _atax_project_(
            grads, refs[0] if k == 1 else refs, mode="orthogonal", strength=1.0, granularity="global", backend=backend
        )

    return run


def default_backends(device: str) -> list[str]:
    try:
        bks = list(_atax_available_backends())
    except Exception as exc:  # a half-landed registry must not stop the baselines from running
        print(f"warning: atax_kernels.available_backends() failed ({type(exc).__name__}: {exc}); "
              "benchmarking backend 'torch' only", file=sys.stderr)
        bks = ["torch"]
    dev = torch.device(device).type
    if dev == "cpu":
        return [b for b in bks if b not in ("cuda", "triton")]
    return [b for b in bks if b != "cpu"]


def implementations(backends: Sequence[str], k: int) -> dict[str, Callable]:
    impls: dict[str, Callable] = {SEED: seed_project_, FOREACH: foreach_project_}
    for b in backends:
        impls[atax_name(b)] = _atax_impl(b, k)
    return impls


def impl_by_name(name: str, k: int) -> Callable:
    if name == SEED:
        return seed_project_
    if name == FOREACH:
        return foreach_project_
    if name.startswith("atax[") and name.endswith("]"):
        return _atax_impl(name[5:-1], k)
    raise KeyError(name)


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------
def _is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


class Timer:
    """Times one call in ms: perf_counter on CPU, CUDA events (after syncing the setup work) on CUDA."""

    def __init__(self, device: str):
        self.cuda = _is_cuda(device)

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


#: The floor probe's footprint is capped here: far beyond any last-level cache, so it still measures DRAM
#: bandwidth, without allocating the 9 GB a full-size k = 8 fp32 case would move.
FLOOR_MAX_BYTES = 1 << 30


def floor_numel(case: "Case") -> int:
    """Probe elements that move the case's minimum traffic (capped at FLOOR_MAX_BYTES).

    Sized by bytes, not by the case's element count: a probe much smaller than the op's working set can sit
    in cache on small (``--quick``) cases and report a bandwidth the op can never see, and one much larger
    measures a different regime.
    """
    per_elem = (2 if _is_cuda(case.device) else 3) * 4
    return max(1, min(case.min_traffic_bytes, FLOOR_MAX_BYTES) // per_elem)


class StreamFloor:
    """The memory-bandwidth roofline probe over M float32 elements.

    CPU: ``torch.add(b, c, out=a)`` (triad-like, 3 * 4 * M bytes). CUDA: device-to-device ``a.copy_(b)``
    (2 * 4 * M bytes). ``bytes_per_call / time`` is the achieved bandwidth; an op's floor time is its minimum
    traffic divided by that bandwidth.
    """

    def __init__(self, numel: int, device: str):
        self.cuda = _is_cuda(device)
        self.a = torch.zeros(numel, dtype=torch.float32, device=device)  # touched: no first-write page faults
        self.b = torch.rand(numel, dtype=torch.float32, device=device)
        self.c = None if self.cuda else torch.rand(numel, dtype=torch.float32, device=device)
        self.bytes_per_call = (2 if self.cuda else 3) * 4 * numel

    def __call__(self) -> None:
        if self.cuda:
            self.a.copy_(self.b)
        else:
            torch.add(self.b, self.c, out=self.a)


# --------------------------------------------------------------------------------------------------------------
# Correctness and memory
# --------------------------------------------------------------------------------------------------------------
# Loose on purpose: the seed itself accumulates its fp32 dot over all N elements (~5e-4 relative at 124 M);
# a wrong kernel (no-op, wrong coefficient, wrong tensor) is off by O(1) on this data.
TOLERANCE = {"fp32": 1e-2, "bf16": 5e-2, "fp16": 3e-2}


@torch.no_grad()
def rel_err(x: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    """||x - ref|| / ||ref|| over the whole list, accumulated in float64 tensor by tensor."""
    num = den = 0.0
    for a, b in zip(x, ref):
        bd = b.double()
        num += float((a.double() - bd).pow(2).sum())
        den += float(bd.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _memory_one(case: Case, impl: str, seed: int) -> dict:
    fn = impl_by_name(impl, case.k)
    # Load libraries / start thread pools with a tiny problem first so they are not counted.
    tg, tr = make_data(dataclasses.replace(case, scale=1e-3), seed=1)
    fn(tg, tr)
    del tg, tr
    grads, refs = make_data(case, seed=seed)
    gc.collect()
    if _is_cuda(case.device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(grads, refs)
        torch.cuda.synchronize()
        return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - base, "method": "cuda max_memory_allocated"}
    before = _proc_status()
    exact = _reset_peak_rss()
    if exact:
        before = _proc_status()
    fn(grads, refs)
    after = _proc_status()
    base = before["VmRSS"] if exact else max(before["VmRSS"], before["VmHWM"])
    res = {
        "peak_extra_bytes": max(0, after["VmHWM"] - base),
        "baseline_rss_bytes": before["VmRSS"],
        "method": "VmHWM after clear_refs" if exact else "VmHWM (lower bound)",
    }
    del grads, refs
    gc.collect()
    return res


@torch.no_grad()
def memory_child(spec: dict) -> list[dict]:
    """Runs in a fresh process: peak RSS growth (CUDA: peak allocation growth) of one projection per case.

    The parent starts it with MALLOC_MMAP_THRESHOLD_=65536, so every buffer above 64 KiB is its own mapping,
    returned to the OS when freed: several cases in one child do not hide each other's temporaries.
    """
    torch.set_num_threads(int(spec.get("threads", torch.get_num_threads())))
    out = []
    for c in spec["cases"]:
        try:
            out.append(_memory_one(Case(**c), spec["impl"], spec.get("seed", 0)))
        except Exception as exc:
            out.append({"error": f"{type(exc).__name__}: {exc}"[:200]})
    return out


def run_memory_child(cases: Sequence[Case] | Case, impl: str, seed: int = 0, timeout: float = 3600) -> list[dict] | dict:
    """Peak extra memory of ``impl`` on each case, measured in one fresh ``python -m atax_kernels.bench`` child."""
    single = isinstance(cases, Case)
    cases = [cases] if single else list(cases)
    spec = {
        "cases": [dataclasses.asdict(c) for c in cases],
        "impl": impl,
        "seed": seed,
        "threads": torch.get_num_threads(),
    }
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    cmd = [sys.executable, "-m", "atax_kernels.bench", "--_memory-child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
            res = [{"error": f"rc={p.returncode}: {tail[0][:200]}"}] * len(cases)
        else:
            res = json.loads(p.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        res = [{"error": "timeout"}] * len(cases)
    except (ValueError, IndexError):
        res = [{"error": "unparsable child output"}] * len(cases)
    return res[0] if single else res


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------
def _progress(total: int, desc: str, disable: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, disable=disable, leave=False, dynamic_ncols=True)
    except ImportError:  # pragma: no cover

        class _Null:
            def update(self, n=1): ...
            def set_description(self, d): ...
            def close(self): ...

        return _Null()


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
            if _is_cuda(case.device):
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


def measure_memory(
    records: list[dict], cases: dict[str, Case], jobs: int, disable_progress: bool, per_case: bool = True
) -> None:
    """Fills peak_extra_* into the records. per_case: one fresh child per (case, impl); else one per impl."""
    todo = [r for r in records if r["impl"] != FLOOR and not r.get("error")]
    if per_case:
        groups = [[r] for r in todo]
    else:
        by_impl: dict[str, list[dict]] = {}
        for r in todo:
            by_impl.setdefault(r["impl"], []).append(r)
        groups = list(by_impl.values())
    bar = _progress(len(todo), "peak memory (fresh processes)", disable_progress)

    def one(group):
        res = run_memory_child([cases[r["case"]] for r in group], group[0]["impl"])
        bar.update(len(group))
        return group, res

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        for group, results in ex.map(one, groups):
            for r, res in zip(group, results):
                r["memory_isolation"] = "process per case" if per_case else "process per implementation"
                if "error" in res:
                    r["peak_extra_error"] = res["error"]
                    continue
                nbytes = res["peak_extra_bytes"]
                one_copy = r["numel"] * DTYPES[r["dtype"]].itemsize
                r["peak_extra_bytes"] = nbytes
                r["peak_extra_mb"] = nbytes / 2**20
                r["peak_extra_pct_of_grad"] = 100.0 * nbytes / one_copy
                r["memory_method"] = res.get("method")
    bar.close()


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------
COLUMNS = ["impl", "median ms", "GB/s", "x floor", "vs seed", "peak extra MB", "% of grad", "check"]


def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _row(r: dict) -> list[str]:
    if r.get("error"):
        return [r["impl"], "error", "-", "-", "-", "-", "-", r["error"][:60]]
    if r["impl"] == FLOOR:
        lo, hi = r.get("floor_bandwidth_gbps_range", (float("nan"), float("nan")))
        check = (f"{r['probe']}, {r['floor_bandwidth_gbps']:.1f} GB/s "
                 f"(range {lo:.1f}-{hi:.1f} over {r.get('floor_probes', '?')} probes)")
    elif r["ok"] is None:
        check = "-"
    else:
        check = ("ok" if r["ok"] else "MISMATCH") + f" ({r['rel_err']:.1e})"
    mem_mb = r.get("peak_extra_mb")
    pct = r.get("peak_extra_pct_of_grad")
    if r.get("peak_extra_error"):
        mem_mb_s, pct_s = "err", "-"
    else:
        mem_mb_s, pct_s = _fmt(mem_mb, ".1f"), _fmt(pct, ".0f")
    return [
        r["impl"],
        _fmt(r["median_ms"], ".2f"),
        _fmt(r["gbps"], ".1f"),
        _fmt(r["x_floor"], ".2f"),
        _fmt(r["speedup_vs_seed"], ".2f") + ("x" if not math.isnan(r["speedup_vs_seed"]) else ""),
        mem_mb_s,
        pct_s,
        check,
    ]


def case_title(r: dict) -> str:
    return (
        f"{r['case']} on {r['device']}: N = {r['numel']:,} in {r['n_tensors']} tensors (scale {r['scale']:g}), "
        f"min traffic {r['min_traffic_bytes'] / 1e6:,.1f} MB"
    )


def format_tables(records: list[dict], markdown: bool = False) -> str:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["case"], []).append(r)
    parts = []
    for _, rs in groups.items():
        rows = [_row(r) for r in rs]
        if markdown:
            lines = [f"### {case_title(rs[0])}", "", "| " + " | ".join(COLUMNS) + " |"]
            lines.append("|" + "|".join("---" if i in (0, 7) else "---:" for i in range(len(COLUMNS))) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            w = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
            fmt_line = lambda cells: "  ".join(  # noqa: E731
                c.ljust(w[i]) if i in (0, 7) else c.rjust(w[i]) for i, c in enumerate(cells)
            ).rstrip()
            lines = [case_title(rs[0]), fmt_line(COLUMNS), fmt_line(["-" * x for x in w])]
            lines += [fmt_line(row) for row in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str, argv: Sequence[str]) -> dict:
    try:
        import triton  # noqa: F401

        triton_v = triton.__version__
    except Exception:
        triton_v = "not installed"
    if _is_cuda(device) and torch.cuda.is_available():
        machine = f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda}); host CPU {_cpu_model()}"
    else:
        machine = f"{_cpu_model()}, {os.cpu_count()} cores"
    return {
        "machine": machine,
        "torch_threads": torch.get_num_threads(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_v,
        "atax_kernels": atax_version(),
        "command": " ".join([os.path.basename(sys.executable), "-m", "atax_kernels.bench", *argv]),
    }


def markdown_report(env: dict, records: list[dict], wall_s: float) -> str:
    head = [
        "# atax_kernels projection benchmark",
        "",
        f"- machine: {env['machine']} (torch threads: {env['torch_threads']})",
        f"- date: {env['date_utc']}",
        f"- git commit: {env['git_commit']}",
        f"- versions: python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
        f"atax_kernels {env['atax_kernels']}",
        f"- command: `{env['command']}`",
        f"- wall time: {wall_s:.1f} s",
        "",
        "Columns: median over the repeats (interleaved round-robin in one process); GB/s of the minimum traffic "
        "N·(3·s_g + 2k·s_r); x floor = time / (minimum traffic / stream bandwidth), the stream bandwidth being the "
        "median of a probe that moves the same bytes, run before every implementation in every round (its range "
        "is in the floor row); peak extra memory = peak "
        "RSS growth (CUDA: max_memory_allocated growth) of one projection in a fresh process, after grads and "
        "refs exist; check = relative L2 difference to the seed's result.",
        "",
        "",
    ]
    return "\n".join(head) + format_tables(records, markdown=True)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


#: ``python -m atax_kernels.bench <subcommand>``: name -> (module in this package, one-line description).
SUBCOMMANDS = {
    "project": ("core", "project_ (gradient space) vs the seed reference (torch.cat), stock torch._foreach and the "
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m atax_kernels.bench project",
        description="Benchmark atax_kernels.project_ against the seed reference, stock foreach and the stream floor "
        "on GPT-2-small-shaped gradient lists. List-valued flags take comma-separated lists.",
    )
    p.add_argument("--scale", type=float, default=None, help="fraction of GPT-2 small (default 1.0; --quick 0.01)")
    p.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32,bf16,fp16 (default fp32,bf16)")
    p.add_argument("--k", default="1,4", help="comma list of reference counts (default 1,4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--backends", default=None, help="comma list of atax backends (default: available for the device)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per implementation (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs after the check run, >= 1 (default 2; --quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--json", metavar="PATH", help="write the raw records (and environment) as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write a markdown report (environment header + tables)")
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m atax_kernels.bench [project|remove-span|optimizer] [flags]`` (no subcommand: ``project``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        top_parser().print_help()
        return 0
    if argv[:1] in (["remove-span"], ["optimizer"]):  # each has its own module and parser
        import importlib

        module = importlib.import_module(f".{SUBCOMMANDS[argv[0]][0]}", __package__)
        return module.main(argv[1:])
    if argv[:1] == ["project"]:
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        top_parser().error(f"unknown subcommand {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
    return project_main(argv)


def project_main(argv: Sequence[str]) -> int:
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
    dtypes = _csv(args.dtype)
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    ks = [int(k) for k in _csv(args.k)]
    if any(k < 1 for k in ks):
        raise SystemExit("--k values must be >= 1")
    if _is_cuda(args.device) and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    backends = _csv(args.backends) if args.backends else default_backends(args.device)

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
        f"{', '.join(backends) or '(none)'}{' [STAND-IN: atax_kernels API not importable]' if ATAX_STANDIN else ''}; "
        f"repeat {repeat}, warmup {warmup}",
        flush=True,
    )
    n_impls = 2 + len(backends)
    bar = _progress(len(cases) * 2 * n_impls, "timing (cases x implementations)", args.no_progress)
    records: list[dict] = []
    for case in cases:
        bar.set_description(f"timing {case.name}")
        records += bench_case(case, backends, repeat, warmup, check=not args.no_check, progress=bar)
    bar.close()
    t_timing = time.perf_counter() - t0
    if not args.no_memory:
        if _is_cuda(args.device):
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
