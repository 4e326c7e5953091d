"""End-to-end alignment-tax demo on two tiny tasks, scored on held-out data: ``python -m atax_kernels.demo``.

Each task (``atax_kernels.tasks``) pretrains a tiny random-init Llama to ~100 % on a capability, then
safety-tunes it. ``modular``: refuse prompts led by a MARKER token (a token trigger). ``overflow``: refuse the
sums that wrap around mod 23 (a semantic trigger: both sides share every token). Every method trains only on
the tasks' ``*_train`` splits (PTX batches, KL prompts, reference gradients and activation bases draw from
``capability_train``); every score is on the held-out ``*_eval`` splits, with the train-split score beside it.

Methods, each at several learning rates (``extra fwd/bwd`` = extra forward/backward passes per step in units
of one training batch, the matched-compute axis):

* ``plain``: AdamW on the safety loss (0 / 0);
* ``ptx λ``: plus λ x the capability loss on a capability_train batch (1 / 1);
* ``kl 0.5``: plus 0.5 x KL(policy || base) on the safety prompts (1 / 0);
* ``interp α``: weight interpolation of the plain run towards the base (0 / 0);
* ``grad: loss ref``: ``ProjectedOptimizer`` against one capability-loss gradient (1 / 1);
* ``grad: 4 tempered (update)``: 4 tempered-CE references (T = 30), update projection (4 / 4);
* ``act e<E> c<β>``: :class:`~atax_kernels.ActivationSubspace` bases of capability_train's layer inputs
  (energy E, contrast β), every Linear's AdamW update projected off them, refreshed every 10 steps (one
  no-grad forward of capability_train: ~0.2 / 0); ``+ ptx 1.0`` adds the PTX term (1.2 / 1).

``--full`` adds ``grad: conflict`` and ``grad: tempered + ptx 0.1`` and runs 3 seeds (split seed and
fine-tuning seed), reporting mean ± std. Seeded and deterministic (rows do not depend on ``--jobs``).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import tasks as _tasks
from .interpolate import interpolate_
from .tasks._common import REFUSE, flush_denormal, make_model
from .tax import expected_calibration_error, mean_entropy, measure_alignment_tax

DEFAULT_LRS = (1e-4, 3e-4, 1e-3)
QUICK_LRS = (3e-4, 1e-3)
INTERP_ALPHAS = (0.25, 0.5, 0.75)


@dataclass
class Method:
    """One mitigation: keyword arguments for ``ArithmeticTask.finetune_safety`` (or an interpolation)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = ""
    dial: float | None = None  # the value of the knob that trades safety for capability within a family


def methods(quick: bool = False, full: bool = False) -> list[Method]:
    """The demo's methods: ``quick`` is the CI size, ``full`` adds the slower gradient variants."""
    tempered = dict(method="projected", reference="tempered", temperature=30.0, n_refs=4)
    out = [
        Method("plain", dict(method="plain"), "ptx", 0.0),
        Method("ptx 0.1", dict(method="ptx", ptx_weight=0.1), "ptx", 0.1),
        Method("ptx 1.0", dict(method="ptx", ptx_weight=1.0), "ptx", 1.0),
        Method("kl 0.5", dict(method="kl", kl_weight=0.5), "kl", 0.5),
        Method("interp", {}, "interp"),
        Method("grad: loss ref", dict(method="projected", reference="loss", n_refs=1), "grad"),
        Method("grad: 4 tempered (update)", dict(tempered, target="update"), "grad"),
    ]
    if full:
        out += [
            Method("grad: conflict", dict(tempered, target="update", mode="conflict"), "grad"),
            Method("grad: tempered + ptx 0.1", dict(tempered, target="grad", ptx_weight=0.1), "grad"),
        ]
    for ptx in (0.0, 1.0):
        for contrast in (0.0, 1.0):
            for energy in (0.9, 0.99):
                name = f"act e{energy:g} c{contrast:g}" + (" + ptx 1.0" if ptx else "")
                out.append(Method(name, dict(method="activation", energy=energy, contrast=contrast, ptx_weight=ptx),
                                  f"act c{contrast:g}" + (" + ptx" if ptx else ""), energy))
    if quick:
        keep = {"plain", "ptx 1.0", "interp", "grad: loss ref", "act e0.99 c0", "act e0.9 c1 + ptx 1.0"}
        out = [m for m in out if m.name in keep]
    return out


# --- evaluation -----------------------------------------------------------------------------------

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
_worker: dict[str, Any] = {}


def _init_worker(base_states: dict[str, dict[str, torch.Tensor]]) -> None:
    torch.set_num_threads(1)
    _worker.clear()
    for name, state in base_states.items():
        base = make_model(seed=0)
        base.load_state_dict(state)
        base.eval()
        for p in base.parameters():
            p.requires_grad_(False)
        _worker[name] = base


def _base_scores(task, base, splits) -> torch.Tensor:
    logits, labels = task.answer_logits(base, splits.capability_eval, safety=False)
    return (logits.argmax(-1) == labels).double()


def _train_one(task_name: str, m: Method, lr: float, steps: int, seed: int
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """One (task, method, lr, seed) run in this process; returns its row and, for plain runs, the trained
    weights (the source of the interpolation rows)."""
    task, base = _tasks.get(task_name), _worker[task_name]
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
            task, base = _tasks.get(t), _worker[t]
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
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()


# --- reporting -------------------------------------------------------------------------------------

def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (sample) std over seeds for each (task, method, lr); one output row per group, in order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], r["lr"]), []).append(r)
    out = []
    for (task, method, lr), rs in groups.items():
        agg: dict[str, Any] = dict(task=task, method=method, lr=lr, family=rs[0]["family"], dial=rs[0]["dial"],
                                   n_seeds=len(rs), extra_forward=rs[0]["extra_forward"],
                                   extra_backward=rs[0]["extra_backward"])
        for key in ("capability", "capability_train", "safety", "safety_train", "over_refusal", "tax", "ece",
                    "entropy", "seconds"):
            vals = [float(r[key]) for r in rs]
            agg[key] = statistics.fmean(vals)
            agg[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def _pm(r: dict[str, Any], key: str) -> str:
    return f"{r[key]:.2f} ± {r[key + '_std']:.2f}" if r["n_seeds"] > 1 else f"{r[key]:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """One markdown table per task: held-out scores with train-split scores beside them (mean ± std over
    seeds when there are several), compute per step and wall time."""
    agg = aggregate(rows)
    head = ["method", "lr", "capability (eval)", "capability (train)", "safety (eval)", "safety (train)",
            "over-refusal", "ECE", "entropy", "extra fwd/step", "extra bwd/step", "wall s"]
    out = []
    for task in dict.fromkeys(r["task"] for r in agg):
        out += [f"### task `{task}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in agg:
            if r["task"] != task:
                continue
            out.append("| " + " | ".join([
                r["method"], f"{r['lr']:g}", _pm(r, "capability"), _pm(r, "capability_train"), _pm(r, "safety"),
                _pm(r, "safety_train"), f"{r['over_refusal']:.3f}", f"{r['ece']:.3f}", f"{r['entropy']:.3f}",
                f"{r['extra_forward']:g}", f"{r['extra_backward']:g}", f"{r['seconds']:.1f}"]) + " |")
        out.append("")
    return "\n".join(out)


def format_summary(rows: list[dict[str, Any]]) -> str:
    """Compact per-task matrix: held-out capability (safety) per method and learning rate."""
    agg = aggregate(rows)
    out = []
    for task in dict.fromkeys(r["task"] for r in agg):
        lrs = sorted({r["lr"] for r in agg if r["task"] == task})
        out += [f"**{task}** — held-out capability kept (held-out safety); mean ± std over seeds where > 1", "",
                "| method | extra fwd/bwd | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                "|---|---|" + "---|" * len(lrs)]
        for method in dict.fromkeys(r["method"] for r in agg if r["task"] == task):
            cells, cost = [], ""
            for lr in lrs:
                r = next((x for x in agg if x["task"] == task and x["method"] == method and x["lr"] == lr), None)
                if r is None:
                    cells.append("")
                    continue
                cost = f"{r['extra_forward']:g} / {r['extra_backward']:g}"
                cell = _pm(r, "capability") + f" ({r['safety']:.2f})"
                cells.append(cell)
            out.append(f"| {method} | {cost} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


LEGEND = """Columns: **capability (eval)** — fraction of the held-out capability prompts (`capability_eval`, never
trained on) answered correctly; **(train)** — the same on `capability_train`, the pairs PTX, KL, references and
activation bases draw from (a gap between the two is fitting); **safety (eval)** — fraction of the held-out
safety prompts refused; **over-refusal** — held-out capability prompts answered REFUSE; **ECE** — expected
calibration error of the answer distribution on capability_eval; **entropy** — its mean entropy (nats);
**extra fwd/bwd per step** — forward/backward passes beyond the safety batch's own, in units of one
batch (compare methods at matched cost: PTX pays 1 / 1); **wall s** — wall time of the run on one thread.
Methods: `plain` AdamW on the safety loss; `ptx λ` plus λ x capability loss; `kl β` plus β x KL to the base;
`interp α` the plain run's weights pulled towards the base; `grad: …` gradient-space projection with
`ProjectedOptimizer` (reference kind, count, target); `act eE cβ` activation-space projection with
`ActivationSubspace(energy=E, contrast=β)`, refreshed every 10 steps."""


_MARKERS = "osD^vP*X<>hpd8H"


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Per task: held-out capability vs learning rate and held-out safety vs learning rate (a line per method,
    error bars over seeds, distinct colour and marker), and a safety-vs-capability panel at the middle learning
    rate for the families with a dial (interpolation α, PTX weight, activation energy), labelled by the dial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    task_names = list(dict.fromkeys(r["task"] for r in agg))
    fig, axes = plt.subplots(len(task_names), 3, figsize=(19, 5.6 * len(task_names)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    method_names = list(dict.fromkeys(r["method"] for r in agg if not r["method"].startswith("interp ")
                                      or r["method"] == "interp 0.5"))
    # ten distinct colours, then the same colours dashed: no two methods share colour, marker and line style
    style = {m: (cmap(i % 10), _MARKERS[i % len(_MARKERS)], "-" if i < 10 else "--")
             for i, m in enumerate(method_names)}
    for ti, task in enumerate(task_names):
        ax_cap, ax_saf, ax_trade = axes[ti]
        for method in method_names:
            pts = sorted((r["lr"], r) for r in agg if r["task"] == task and r["method"] == method)
            if not pts:
                continue
            colour, marker, line = style[method]
            xs = [lr for lr, _ in pts]
            for ax, key in ((ax_cap, "capability"), (ax_saf, "safety")):
                ax.errorbar(xs, [r[key] for _, r in pts], yerr=[r[key + "_std"] for _, r in pts], color=colour,
                            marker=marker, linestyle=line, capsize=3, label=method, linewidth=1.4,
                            markersize=6)
        for ax, what in ((ax_cap, "capability kept"), (ax_saf, "safety (refusal rate)")):
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel(f"held-out {what}")
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            ax.set_title(f"{task}: held-out {what} vs learning rate")
        lrs = sorted({r["lr"] for r in agg if r["task"] == task})
        mid = lrs[len(lrs) // 2]
        families: dict[str, list[dict[str, Any]]] = {}
        for r in agg:
            if r["task"] == task and r["lr"] == mid and r["dial"] is not None and r["family"] not in ("kl",):
                families.setdefault(r["family"], []).append(r)
        base_cap = 1.0
        for fi, (fam, rs) in enumerate(families.items()):
            rs = sorted(rs, key=lambda r: r["dial"])
            if fam == "interp":
                plain = next((r for r in agg if r["task"] == task and r["lr"] == mid and r["method"] == "plain"), None)
                rs = rs + ([plain] if plain else [])
            colour = plt.get_cmap("tab10")(fi % 10)
            xs, ys = [r["safety"] for r in rs], [r["capability"] for r in rs]
            ax_trade.errorbar(xs, ys, xerr=[r["safety_std"] for r in rs], yerr=[r["capability_std"] for r in rs],
                              color=colour, marker=_MARKERS[fi], capsize=3, label=fam)
            for r, x, y in zip(rs, xs, ys):
                dial = 1.0 if (fam == "interp" and r["method"] == "plain") else r["dial"]
                name = {"interp": "α", "ptx": "λ"}.get(fam, "E")
                ax_trade.annotate(f"{name}={dial:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                  color=colour)
        ax_trade.scatter([0.0], [base_cap], marker="*", s=160, color="black", label="base model (α=0)", zorder=5)
        ax_trade.set_xlabel("held-out safety")
        ax_trade.set_ylabel("held-out capability kept")
        ax_trade.set_xlim(-0.05, 1.08)
        ax_trade.set_ylim(-0.05, 1.08)
        ax_trade.grid(alpha=0.3)
        ax_trade.legend(fontsize=7, loc="lower left")
        ax_trade.set_title(f"{task}: what each dial trades (lr {mid:g})")
    seeds = sorted({r["seed"] for r in rows})
    fig.suptitle(f"Alignment tax on two tiny tasks, held-out scores ({len(seeds)} seed(s); error bars: std over seeds)")
    # one legend for the learning-rate panels of every task (same colours, markers and lines), outside the axes
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.025 * math.ceil(len(labels) / 6) / len(task_names), 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_info(argv: Sequence[str], wall_s: float) -> dict[str, Any]:
    """Where and how rows were made: machine, date, commit, versions, command, wall time (saved with them)."""
    from .bench.core import environment

    env = environment("cpu", [])
    return dict(env, command=f"python -m atax_kernels.demo {' '.join(argv)}", wall_s=wall_s)


def markdown_report(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The report: header (machine, date, commit, command and wall time of the run that made the rows, from
    :func:`run_info`), summary matrix, every row, legend."""
    env = info
    seeds = sorted({r["seed"] for r in rows})
    head = [
        "# atax_kernels demo: the alignment tax of a tiny Llama on two tasks, held-out scores",
        "",
        f"- machine: {env['machine']}; date: {env['date_utc']}; git commit: {env['git_commit']}",
        f"- versions: python {env['python']}, torch {env['torch']}, atax_kernels {env['atax_kernels']}",
        f"- command: `{env['command']}`" + (f" (this report re-rendered by `{env['rendered_by']}`)"
                                            if env.get("rendered_by") else ""),
        *([f"- note: {env['note']}"] if env.get("note") else []),
        f"- {len(rows)} rows, seeds {seeds}, in {env['wall_s']:.0f} s; steps {rows[0]['steps'] if rows else '-'}; wall s per row: one run on one thread, 2 runs side by side",
        "",
        "## Summary",
        "",
        format_summary(rows),
        "## Every row",
        "",
        format_table(rows),
        LEGEND,
        "",
    ]
    return "\n".join(head)


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
        prog="python -m atax_kernels.demo", description=__doc__.split("\n")[0],
        epilog="Time on 2 CPU cores: the default run (both tasks, 1 seed, 300 steps, 3 learning rates) ~3 min "
        "(180 s measured), plus ~4 min on a fresh clone to set up the venv, build the extension and pretrain the "
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


if __name__ == "__main__":
    sys.exit(main())
