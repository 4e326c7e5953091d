"""Peak extra memory of one projection, measured in a fresh ``python -m atax_kernels.bench`` child process per
case (or per implementation), and folded into the timing records."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from ._cli import progress_bar
from .env import is_cuda, proc_status, reset_peak_rss
from .cases import DTYPES, Case, make_data
from .impls import FLOOR, impl_by_name


def _memory_one(case: Case, impl: str, seed: int) -> dict:
    fn = impl_by_name(impl, case.k)
    # Load libraries / start thread pools with a tiny problem first so they are not counted.
    tg, tr = make_data(dataclasses.replace(case, scale=1e-3), seed=1)
    fn(tg, tr)
    del tg, tr
    grads, refs = make_data(case, seed=seed)
    gc.collect()
    if is_cuda(case.device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(grads, refs)
        torch.cuda.synchronize()
        return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - base, "method": "cuda max_memory_allocated"}
    before = proc_status()
    exact = reset_peak_rss()
    if exact:
        before = proc_status()
    fn(grads, refs)
    after = proc_status()
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
    bar = progress_bar(len(todo), "peak memory (fresh processes)", disable_progress)

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

