"""The demo's runs: the cached pretrained base of each task, one fine-tuning run per (task, method, learning
rate, seed) in worker processes, the interpolation rows made from the plain runs, and each row's held-out
scores."""
from __future__ import annotations

import copy
import hashlib
import os
import sys
import time
from typing import Any, Callable, Sequence

import torch

from .. import tasks as _tasks
from ..interpolate import interpolate_
from ..tasks.data import make_model
from ..tasks.training import flush_denormal
from ..tax import expected_calibration_error, mean_entropy, measure_alignment_tax
from .methods import DEFAULT_LRS, INTERP_ALPHAS, QUICK_LRS, Method, methods


def evaluate_row(task, model: torch.nn.Module, splits, base_scores: torch.Tensor) -> dict[str, Any]:
    """Held-out scores (and train-split scores) of one model, plus tax CI, ECE and entropy on capability_eval."""
    scores = task.evaluate(model, splits)
    cap_logits, cap_labels = task.answer_logits(model, splits.capability_eval, safety=False)
    per_example = (cap_logits.argmax(-1) == cap_labels).double()
    report = measure_alignment_tax("base", "model", lambda m: base_scores if m == "base" else per_example,
                                   n_bootstrap=500)
    return dict(scores, tax=report.tax, tax_ci=[report.ci_low, report.ci_high],
                ece=expected_calibration_error(cap_logits, cap_labels, from_logits=True),
                entropy=mean_entropy(cap_logits))


# --- the base models --------------------------------------------------------------------------------

def _cache_dir() -> str:
    root = os.environ.get("ATAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "atax_kernels")
    os.makedirs(root, exist_ok=True)
    return root


def base_model(task_name: str, seed: int = 0, pretrain_steps: int = 300, log: Callable[..., None] = print
               ) -> torch.nn.Module:
    """The pretrained base of a task, cached on disk so a second run starts at once."""
    import transformers

    task = _tasks.get(task_name)
    key = hashlib.sha1(f"{task_name}-{seed}-{pretrain_steps}-{transformers.__version__}-{torch.__version__}"
                       .encode()).hexdigest()[:12]
    path = os.path.join(_cache_dir(), f"demo_base_{task_name}_{key}.pt")
    model = make_model(seed=seed)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu"))
        log(f"{task_name}: base model loaded from {path}")
    else:
        t0 = time.perf_counter()
        info = task.pretrain(model, steps=pretrain_steps, seed=seed)
        torch.save(model.state_dict(), path)
        log(f"{task_name}: base model pretrained in {time.perf_counter() - t0:.1f} s "
            f"(capability {info['capability']:.3f}), cached at {path}")
    model.eval()
    return model


# Per-process state of a worker: the frozen base model of each task.
_frozen_bases: dict[str, Any] = {}


def _init_worker(base_states: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load every task's frozen base from its state dict (once per worker process; one thread each)."""
    torch.set_num_threads(1)
    _frozen_bases.clear()
    for name, state in base_states.items():
        base = make_model(seed=0)
        base.load_state_dict(state)
        base.eval()
        for p in base.parameters():
            p.requires_grad_(False)
        _frozen_bases[name] = base


def _base_scores(task, base, splits) -> torch.Tensor:
    logits, labels = task.answer_logits(base, splits.capability_eval, safety=False)
    return (logits.argmax(-1) == labels).double()


def _train_one(task_name: str, m: Method, lr: float, steps: int, seed: int
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """One (task, method, lr, seed) run in this process; returns its row and, for plain runs, the trained
    weights (the source of the interpolation rows)."""
    task, base = _tasks.get(task_name), _frozen_bases[task_name]
    splits = task.splits(seed)
    torch.manual_seed(seed)  # each run on its own: rows do not depend on which runs came before
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    kwargs = dict(m.kwargs)
    if kwargs.get("method") == "kl":
        kwargs["base"] = base
    with flush_denormal():
        out = task.finetune_safety(model, splits=splits, steps=steps, lr=lr, seed=seed, **kwargs)
        row = dict(task=task_name, method=m.name, family=m.family, dial=m.dial, lr=lr, seed=seed, steps=steps,
                   extra_forward=round(out["extra_forward"], 3), extra_backward=out["extra_backward"],
                   seconds=out["seconds"], removed_fraction=out["removed_fraction"],
                   **evaluate_row(task, model, splits, _base_scores(task, base, splits)))
    return row, (model.state_dict() if m.name == "plain" else None)


# --- the run ---------------------------------------------------------------------------------------

def run(quick: bool = False, full: bool = False, seeds: Sequence[int] | None = None, steps: int | None = None,
        lrs: Sequence[float] | None = None, task_names: Sequence[str] | None = None, progress: bool = True,
        log: Callable[..., None] = print, jobs: int | None = None) -> list[dict[str, Any]]:
    """Run every method at every learning rate and seed on every task; returns the table rows.

    ``jobs`` worker processes train independent runs side by side (default: up to 2, one per core). Each run
    is seeded on its own and trains on one thread, so the rows do not depend on ``jobs`` or on the order in
    which the runs finish. ``seeds`` default: ``(0, 1, 2)`` with ``full``, else ``(0,)``."""
    if jobs is None:
        jobs = max(1, min(2, os.cpu_count() or 1))
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs!r}")
    task_names = list(task_names or _tasks.TASKS)
    for name in task_names:
        _tasks.get(name)  # a clear error for an unknown task before anything runs
    seeds = list(seeds if seeds is not None else ((0, 1, 2) if full else (0,)))
    if not seeds:
        raise ValueError("seeds must not be empty")
    # One thread: the model is tiny (2-thread matmuls only add overhead) and results do not depend on
    # how many cores the machine has.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick, full, seeds, steps, lrs, task_names, progress, log, jobs)
    finally:
        torch.set_num_threads(threads)


def _run(quick, full, seeds, steps, lrs, task_names, progress, log, jobs) -> list[dict[str, Any]]:
    steps = steps or (120 if quick else 300)
    lrs = list(lrs or (QUICK_LRS if quick else DEFAULT_LRS))
    base_states = {}
    for name in task_names:
        base = base_model(name, log=log)
        base_states[name] = {k: v.detach().clone() for k, v in base.state_dict().items()}
    _init_worker(base_states)
    ms = methods(quick=quick, full=full)
    log(f"fine-tuning {steps} steps at lr {lrs}, seeds {seeds}, tasks {task_names}"
        + (f" ({jobs} worker processes)" if jobs > 1 else ""))
    if any(m.name == "interp" for m in ms) and not any(m.name == "plain" for m in ms):
        raise ValueError("the interp rows interpolate the plain run: keep 'plain' in the methods")
    plan = [(t, m, lr, s) for t in task_names for m in ms for lr in lrs for s in seeds]
    trained = [(i, *p) for i, p in enumerate(plan) if p[1].name != "interp"]
    n_rows = sum(len(INTERP_ALPHAS) if p[1].name == "interp" else 1 for p in plan)
    results: dict[int, tuple[dict[str, Any], dict[str, torch.Tensor] | None]] = {}
    bar = _progress(n_rows, progress)
    if jobs == 1:
        for i, t, m, lr, s in trained:
            results[i] = _train_one(t, m, lr, steps, s)
            bar.update(1)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        # longest runs first (extra backward passes dominate), so the workers finish together
        order = sorted(trained, key=lambda x: -(x[2].kwargs.get("n_refs", 0) + bool(x[2].kwargs.get("ptx_weight"))))
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                    initargs=(base_states,)) as pool:
            futures = {pool.submit(_train_one, t, m, lr, steps, s): i for i, t, m, lr, s in order}
            for fut in cf.as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update(1)
    plain_states = {(plan[i][0], plan[i][2], plan[i][3]): state for i, (_, state) in results.items()
                    if state is not None}
    rows: list[dict[str, Any]] = []
    with flush_denormal():
        for i, (t, m, lr, s) in enumerate(plan):
            if m.name != "interp":
                rows.append(results[i][0])
                continue
            task, base = _tasks.get(t), _frozen_bases[t]
            splits = task.splits(s)
            base_scores = _base_scores(task, base, splits)
            plain_row = next(results[j][0] for j, (t2, m2, lr2, s2) in enumerate(plan)
                             if (t2, m2.name, lr2, s2) == (t, "plain", lr, s))
            for alpha in INTERP_ALPHAS:
                # an interpolation costs the plain run it starts from, plus its own (tiny) evaluation
                t1 = time.perf_counter() - plain_row["seconds"]
                mixed = copy.deepcopy(base)
                mixed.load_state_dict(plain_states[(t, lr, s)])
                interpolate_(mixed, base_states[t], alpha)
                rows.append(dict(task=t, method=f"interp {alpha}", family="interp", dial=alpha, lr=lr, seed=s,
                                 steps=steps, extra_forward=0.0, extra_backward=0.0,
                                 seconds=time.perf_counter() - t1, removed_fraction=None,
                                 **evaluate_row(task, mixed, splits, base_scores)))
                bar.update(1)
    bar.close()
    return rows


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="demo rows", file=sys.stderr, disable=not enabled)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        class _NoProgress:
            def update(self, n):
                pass

            def close(self):
                pass

        return _NoProgress()
