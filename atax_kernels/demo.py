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
from .tasks.data import REFUSE, make_model
from .tasks.training import flush_denormal
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


# --- the figure ------------------------------------------------------------------------------------

#: Colour families: one hue per kind of method, shades within it (the recommended settings the strongest shade);
#: the same method has the same colour, marker and line in every figure: the table is fixed, not built from the
#: rows a figure happens to hold. Contrast (c1) runs take their c0 twin's colour, dashed.
FAMILY_COLOURS = {
    "plain": {"plain": "#000000"},
    "ptx": {"ptx 0.1": "#6baed6", "ptx 1.0": "#08519c"},
    "kl": {"kl 0.5": "#8c564b"},
    "interp": {"interp 0.25": "#bcbddc", "interp 0.5": "#807dba", "interp 0.75": "#54278f"},
    "grad": {"grad: loss ref": "#a1d99b", "grad: 4 tempered (update)": "#41ab5d", "grad: conflict": "#006d2c",
             "grad: tempered + ptx 0.1": "#00441b"},
    "act": {"act e0.9 c0": "#fc9272", "act e0.99 c0": "#cb181d"},
    "act + ptx": {"act e0.99 c0 + ptx 1.0": "#fdae6b", "act e0.9 c0 + ptx 1.0": "#d94801"},
}
_FAMILY_MARKERS = "osD^vP"
#: What the README recommends, drawn thick and named in the legend.
RECOMMENDED = {"act e0.99 c0": "recommended default", "act e0.9 c0 + ptx 1.0": "recommended + PTX (semantic trigger)"}
#: Below this held-out safety a point is drawn hollow and its safety printed beside it: not a win.
LOW_SAFETY = 0.8


def colour_family(method: str) -> str:
    """The colour family of a row's method name (``plain``, ``ptx``, ``kl``, ``interp``, ``grad``, ``act``,
    ``act + ptx``)."""
    if method == "plain":
        return "plain"
    if method.startswith("act "):
        return "act + ptx" if "+ ptx" in method else "act"
    for fam in ("ptx", "kl", "interp", "grad"):
        if method.startswith(fam):
            return fam
    return "other"


def _known_methods() -> list[str]:
    names = [m.name for m in methods(full=True) if m.name != "interp"]
    return names[:4] + [f"interp {a}" for a in INTERP_ALPHAS] + names[4:]


def method_style(method: str) -> dict[str, Any]:
    """Colour, marker, line style and width of a method, the same in every figure. Contrast (c1) runs are
    dashed; the recommended settings are thick."""
    fam = colour_family(method)
    shades = FAMILY_COLOURS.get(fam, {})
    base = method.replace(" c1", " c0")
    i = list(shades).index(base) if base in shades else 0
    colour = shades.get(base, next(iter(shades.values()), "#7f7f7f"))
    return dict(color=colour, marker=_FAMILY_MARKERS[i % len(_FAMILY_MARKERS)],
                linestyle="--" if " c1" in method else "-", linewidth=3.2 if method in RECOMMENDED else 1.3,
                markersize=8 if method in RECOMMENDED else 5.5, zorder=4 if method in RECOMMENDED else 2)


def seeds_note(n: int) -> str:
    """``1 seed`` or ``3 seeds; error bars: std``."""
    return "1 seed" if n == 1 else f"{n} seeds; error bars: std"


def _place_labels(fig, ax, items: list[tuple[float, float, str, str]], fontsize: float = 7.0) -> None:
    """Annotate (x, y, text, colour) in data coordinates without overlaps: each label takes the first of a ring
    of offsets whose box overlaps no label placed before it and stays inside the axes; one that finds none is
    dropped (the value is in the tables)."""
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    placed = [t.get_window_extent(renderer) for ax2 in fig.axes for t in ax2.texts if t.get_visible()]
    offsets = [(5, 4), (5, -10), (-5, 4), (-5, -10), (8, 12), (8, -18), (-8, 12), (-8, -18), (14, -3),
               (-14, -3), (5, 20), (5, -26), (-5, 20), (-5, -26), (20, 10), (20, -16), (-20, 10), (-20, -16)]
    for x, y, text, colour in items:
        for dx, dy in offsets:
            t = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                            color=colour, ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top",
                            zorder=6, bbox=dict(boxstyle="square,pad=0.05", fc="white", ec="none", alpha=0.7))
            box = t.get_window_extent(renderer)
            if box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0 and box.y1 <= inside.y1 \
                    and not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            t.remove()


def figure(rows: list[dict[str, Any]]):
    """The demo's figure (a matplotlib Figure; :func:`plot` saves it). Per task: held-out capability kept vs
    learning rate, held-out safety vs learning rate (a line per method: one colour family per kind of method,
    the recommended settings thick), and held-out capability vs held-out safety at the middle learning rate for
    the families with a dial (interpolation α, PTX weight λ, activation energy E), labelled by the dial. In the
    capability panel a point whose held-out safety is below ``LOW_SAFETY`` is hollow with its safety printed:
    high capability there is not a win."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    agg = aggregate(rows)
    task_names = list(dict.fromkeys(r["task"] for r in agg))
    fig, axes = plt.subplots(len(task_names), 3, figsize=(20, 6.0 * len(task_names)), squeeze=False)
    order = {m: i for i, m in enumerate(_known_methods())}
    method_names = sorted(dict.fromkeys(r["method"] for r in agg if not r["method"].startswith("interp ")
                                        or r["method"] == "interp 0.5"), key=lambda m: order.get(m, len(order)))
    pending: list[tuple[Any, list]] = []
    for ti, task in enumerate(task_names):
        ax_cap, ax_saf, ax_trade = axes[ti]
        low: list[tuple[float, float, str, str]] = []
        for method in method_names:
            pts = sorted((r["lr"], r) for r in agg if r["task"] == task and r["method"] == method)
            if not pts:
                continue
            st = method_style(method)
            label = method + (f"  ★ {RECOMMENDED[method]}" if method in RECOMMENDED else "")
            xs = [lr for lr, _ in pts]
            for ax, key in ((ax_cap, "capability"), (ax_saf, "safety")):
                ax.errorbar(xs, [r[key] for _, r in pts], yerr=[r[key + "_std"] for _, r in pts], capsize=3,
                            label=label, **st)
            for lr, r in pts:  # unsafe points: hollow, safety printed beside them
                if r["safety"] < LOW_SAFETY:
                    ax_cap.plot([lr], [r["capability"]], marker=st["marker"], markersize=st["markersize"] + 3,
                                markerfacecolor="white", markeredgecolor=st["color"], markeredgewidth=1.6,
                                linestyle="none", zorder=st["zorder"] + 1)
                    if r["capability"] >= 0.2:
                        low.append((lr, r["capability"], f"safety {r['safety']:.2f}", st["color"]))
        pending.append((ax_cap, low))
        for ax, what in ((ax_cap, "capability kept"), (ax_saf, "safety (refusal rate)")):
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel(f"held-out {what}")
            ax.set_ylim(-0.03, 1.05)
            ax.grid(alpha=0.3)
        ax_cap.set_title(f"{task}: held-out capability kept vs learning rate\n(hollow: held-out safety < "
                         f"{LOW_SAFETY:g}, its value printed — not a win)", fontsize=10)
        ax_saf.set_title(f"{task}: held-out safety (refusal rate) vs learning rate", fontsize=10)
        lrs = sorted({r["lr"] for r in agg if r["task"] == task})
        mid = lrs[len(lrs) // 2]
        families: dict[str, list[dict[str, Any]]] = {}
        for r in agg:
            if r["task"] == task and r["lr"] == mid and r["dial"] is not None and r["family"] not in ("kl",):
                families.setdefault(r["family"], []).append(r)
        trade_labels: list[tuple[float, float, str, str]] = []
        for fam, rs in families.items():
            rs = sorted(rs, key=lambda r: r["dial"])
            if fam == "interp":
                plain = next((r for r in agg if r["task"] == task and r["lr"] == mid and r["method"] == "plain"), None)
                rs = rs + ([plain] if plain else [])
            # the family's colour: its strongest shade's
            member = next((r["method"] for r in rs if r["method"] != "plain"), rs[-1]["method"])
            st = method_style(next(reversed(FAMILY_COLOURS.get(colour_family(member), {"": 0}))))
            st["linestyle"] = "--" if " c1" in rs[-1]["method"] else "-"
            xs, ys = [r["safety"] for r in rs], [r["capability"] for r in rs]
            ax_trade.errorbar(xs, ys, xerr=[r["safety_std"] for r in rs], yerr=[r["capability_std"] for r in rs],
                              color=st["color"], marker=st["marker"], linestyle=st["linestyle"], capsize=3,
                              label={"ptx": "plain → ptx λ"}.get(fam, fam), linewidth=1.5, markersize=6)
            for r, x, y in zip(rs, xs, ys):
                if r["method"] in RECOMMENDED:
                    ax_trade.plot([x], [y], marker="*", markersize=16, color=st["color"], markeredgecolor="black",
                                  linestyle="none", zorder=5)
                dial = 1.0 if (fam == "interp" and r["method"] == "plain") else r["dial"]
                name = {"interp": "α", "ptx": "λ"}.get(fam, "E")
                trade_labels.append((x, y, f"{name}={dial:g}", st["color"]))
        ax_trade.scatter([0.0], [1.0], marker="P", s=120, color="black", label="base model (α=0)", zorder=5)
        ax_trade.add_patch(matplotlib.patches.Rectangle((-0.05, -0.05), LOW_SAFETY + 0.05, 1.13, color="#d62728",
                                                        alpha=0.06, zorder=0))
        ax_trade.text(0.0, -0.03, f"safety < {LOW_SAFETY:g}: not a win", fontsize=8, color="#d62728", va="bottom")
        ax_trade.set_xlabel("held-out safety")
        ax_trade.set_ylabel("held-out capability kept")
        ax_trade.set_xlim(-0.05, 1.1)
        ax_trade.set_ylim(-0.05, 1.1)
        ax_trade.grid(alpha=0.3)
        handles, labels = ax_trade.get_legend_handles_labels()
        handles.append(Line2D([], [], marker="*", markersize=12, color="grey", markeredgecolor="black",
                              linestyle="none"))
        labels.append("recommended setting")
        ax_trade.legend(handles, labels, fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 0.06))
        ax_trade.set_title(f"{task}: what each dial trades (lr {mid:g}); top right is the goal", fontsize=10)
        pending.append((ax_trade, trade_labels))
    seeds = sorted({r["seed"] for r in rows})
    fig.suptitle(f"Alignment tax on two tiny tasks, held-out scores ({seeds_note(len(seeds))})")
    # one legend for the learning-rate panels of every task (same colours, markers and lines), outside the axes
    handles, labels = [], []
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    ncol = 5
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.035 * math.ceil(len(labels) / ncol) / len(task_names), 1, 0.97))
    for ax, items in pending:  # after the layout: label placement works in display coordinates
        _place_labels(fig, ax, items)
    return fig


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Write :func:`figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(rows)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_info(argv: Sequence[str], wall_s: float) -> dict[str, Any]:
    """Where and how rows were made: machine, date, commit, versions, command, wall time (saved with them)."""
    from .bench._env import environment

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
