"""The demo's tables: rows averaged over seeds, the per-task summary matrix, every row, the legend, and the
markdown report with the header of the run that made the rows."""
from __future__ import annotations

import statistics
from typing import Any, Sequence


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



def run_info(argv: Sequence[str], wall_s: float) -> dict[str, Any]:
    """Where and how rows were made: machine, date, commit, versions, command, wall time (saved with them)."""
    from ..bench.env import environment

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
