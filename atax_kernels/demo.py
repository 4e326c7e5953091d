"""End-to-end alignment-tax demo on a tiny language model: ``python -m atax_kernels.demo``.

The task (``atax_kernels.tasks.modular``): a tiny random-init Llama is pretrained to ~100 % on ``a + b mod 23``
(the capability), then safety-tuned to answer a REFUSE token whenever a MARKER token leads the prompt. Every
mitigation is run at several learning rates, so each draws a frontier of (safety, capability kept):

* ``plain``: AdamW on the safety loss;
* ``ptx λ``: the safety loss plus λ x the capability loss (pre-training mix);
* ``kl β``: the safety loss plus β x KL(policy || base) on the training prompts;
* ``interp α``: weight interpolation of the plain run towards the base, θ_base + α (θ − θ_base);
* ``seed recipe``: ``ProjectedOptimizer`` against the capability *loss* gradient (the seed's method);
* ``recommended``: tempered-CE references (T = 30), 4 live references, update projection;
* ``conflict``: the same references, conflict (PCGrad-style cone) projection;
* ``proj + ptx``: gradient projection plus PTX 0.1.

Prints a table (capability kept, safety, over-refusal, tax with a bootstrap CI, ECE, entropy, extra backward
passes per step, wall time), writes ``--json`` rows and a Pareto PNG. Seeded and deterministic.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .interpolate import interpolate_
from .pareto import plot_pareto
from .tasks import modular as M
from .tax import expected_calibration_error, mean_entropy, measure_alignment_tax


@dataclass
class Method:
    """One mitigation: how to fine-tune (kwargs for ``finetune_safety`` or a custom loop)."""

    name: str
    kind: str  # "finetune", "ptx", "kl", "interp"
    kwargs: dict[str, Any] = field(default_factory=dict)
    extra_backwards: int = 0


def methods(quick: bool) -> list[Method]:
    rec = dict(method="projected", reference="tempered", temperature=30.0, n_refs=4, target="update")
    out = [
        Method("plain", "finetune", dict(method="plain")),
        Method("ptx 0.1", "ptx", dict(weight=0.1), 1),
        Method("ptx 1.0", "ptx", dict(weight=1.0), 1),
        Method("kl 0.5", "kl", dict(beta=0.5), 0),
        Method("interp", "interp", dict(alphas=(0.25, 0.5, 0.75))),
        Method("seed recipe (loss ref)", "finetune", dict(method="projected", reference="loss", n_refs=1), 1),
        Method("recommended", "finetune", rec, 4),
        Method("conflict", "finetune", dict(rec, mode="conflict"), 4),
        Method("proj + ptx 0.1", "finetune",
               dict(method="projected", reference="tempered", temperature=30.0, n_refs=4, target="grad",
                    ptx_weight=0.1), 4),
    ]
    if quick:
        keep = {"plain", "ptx 0.1", "interp", "seed recipe (loss ref)", "recommended"}
        out = [m for m in out if m.name in keep]
    return out


# --- evaluation -----------------------------------------------------------------------------------

@torch.no_grad()
def _answer_logits(model: torch.nn.Module, marked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    was = model.training
    model.eval()
    try:
        ids, labels = M.prompts(M.all_pairs(), marked=marked)
        return model(input_ids=ids).logits[:, -1].float(), labels[:, -1]
    finally:
        model.train(was)


def per_example_capability(model: torch.nn.Module) -> torch.Tensor:
    logits, labels = _answer_logits(model, marked=False)
    return (logits.argmax(-1) == labels).double()


def evaluate_row(model: torch.nn.Module, base: torch.nn.Module, base_scores: torch.Tensor) -> dict[str, Any]:
    cap_logits, cap_labels = _answer_logits(model, marked=False)
    saf_logits, _ = _answer_logits(model, marked=True)
    scores = (cap_logits.argmax(-1) == cap_labels).double()
    report = measure_alignment_tax(base, model, lambda m: base_scores if m is base else scores, n_bootstrap=500)
    return {
        "capability": float(scores.mean()),
        "safety": float((saf_logits.argmax(-1) == M.REFUSE).double().mean()),
        "over_refusal": float((cap_logits.argmax(-1) == M.REFUSE).double().mean()),
        "tax": report.tax, "tax_ci": [report.ci_low, report.ci_high],
        "ece": expected_calibration_error(cap_logits, cap_labels, from_logits=True),
        "entropy": mean_entropy(cap_logits),
    }


# --- training loops not covered by finetune_safety -------------------------------------------------

def _mixed_loss_loop(model, base, *, steps, lr, seed, ptx=0.0, kl=0.0, batch_size=64) -> None:
    """AdamW on safety CE + ptx x capability CE + kl x KL(policy || base) on the safety prompts."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        ids, labels = M.safety_batch(batch_size, generator=gen)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=M.IGNORE)
        if ptx:
            cids, clabels = M.capability_batch(batch_size, generator=gen)
            clog = model(input_ids=cids).logits
            loss = loss + ptx * F.cross_entropy(clog.reshape(-1, clog.shape[-1]), clabels.reshape(-1),
                                                ignore_index=M.IGNORE)
        if kl:
            with torch.no_grad():
                ref = base(input_ids=ids).logits
            logp = F.log_softmax(logits, -1)
            loss = loss + kl * (logp.exp() * (logp - F.log_softmax(ref, -1))).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


# --- the run ---------------------------------------------------------------------------------------

def _cache_dir() -> str:
    root = os.environ.get("ATAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "atax_kernels")
    os.makedirs(root, exist_ok=True)
    return root


def base_model(seed: int, pretrain_steps: int, log=print) -> torch.nn.Module:
    """The pretrained base, cached on disk so a second run starts at once."""
    import transformers

    key = hashlib.sha1(f"{seed}-{pretrain_steps}-{transformers.__version__}-{torch.__version__}".encode()).hexdigest()[:12]
    path = os.path.join(_cache_dir(), f"demo_base_{key}.pt")
    model = M.make_model(seed=seed)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu"))
        log(f"base model: loaded from {path}")
    else:
        t0 = time.perf_counter()
        info = M.pretrain(model, steps=pretrain_steps, seed=seed)
        torch.save(model.state_dict(), path)
        log(f"base model: pretrained in {time.perf_counter() - t0:.1f} s "
            f"(capability {info['capability']:.3f}), cached at {path}")
    model.eval()
    return model


def run(quick: bool = False, seed: int = 0, steps: int | None = None, lrs: Sequence[float] | None = None,
        progress: bool = True, log=print, jobs: int | None = None) -> list[dict[str, Any]]:
    """Run every method at every learning rate; returns the table rows (see the module docstring).

    ``jobs`` worker processes train independent runs side by side (default: up to 2, one per core). Each run
    is seeded on its own and trains on one thread, so the rows do not depend on ``jobs`` or on the order in
    which the runs finish."""
    if jobs is None:
        jobs = max(1, min(2, os.cpu_count() or 1))
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    # One thread: the model is tiny (2-thread matmuls only add overhead) and results do not depend on
    # how many cores the machine has.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick, seed, steps, lrs, progress, log, jobs)
    finally:
        torch.set_num_threads(threads)


# Per-process state of a worker: the frozen base model and its per-example capability scores.
_worker: dict[str, Any] = {}


def _init_worker(base_state: dict[str, torch.Tensor], seed: int) -> None:
    torch.set_num_threads(1)
    base = M.make_model(seed=seed)
    base.load_state_dict(base_state)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    _worker.update(base=base, base_scores=per_example_capability(base))


def _train_one(m: Method, lr: float, steps: int, seed: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """One (method, lr) run in this process; returns its row and, for plain runs, the trained weights
    (the source of the interpolation rows)."""
    base, base_scores = _worker["base"], _worker["base_scores"]
    torch.manual_seed(seed)  # each run on its own: rows do not depend on which runs came before
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    with M._flush_denormal():
        if m.kind == "finetune":
            M.finetune_safety(model, steps=steps, lr=lr, seed=seed, **m.kwargs)
        else:
            _mixed_loss_loop(model, base, steps=steps, lr=lr, seed=seed,
                             ptx=m.kwargs.get("weight", 0.0), kl=m.kwargs.get("beta", 0.0))
        seconds = time.perf_counter() - t0
        row = dict(method=m.name, lr=lr, steps=steps, extra_backwards=m.extra_backwards, seconds=seconds,
                   **evaluate_row(model, base, base_scores))
    return row, (model.state_dict() if m.name == "plain" else None)


def _run(quick, seed, steps, lrs, progress, log, jobs) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    steps = steps or (120 if quick else 300)
    lrs = list(lrs or ((3e-4, 1e-3) if quick else (1e-4, 3e-4, 1e-3)))
    base = base_model(seed, pretrain_steps=300, log=log)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    _init_worker(base_state, seed)
    base, base_scores = _worker["base"], _worker["base_scores"]
    log(f"base capability {float(base_scores.mean()):.3f}; fine-tuning {steps} steps at lr {lrs}"
        + (f" ({jobs} worker processes)" if jobs > 1 else ""))
    plan = [(m, lr) for m in methods(quick) for lr in lrs]
    trained = [(i, m, lr) for i, (m, lr) in enumerate(plan) if m.kind != "interp"]
    results: dict[int, tuple[dict[str, Any], dict[str, torch.Tensor] | None]] = {}
    bar = _progress(len(plan), progress)
    if jobs == 1:
        for i, m, lr in trained:
            results[i] = _train_one(m, lr, steps, seed)
            bar.update(1)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        # longest runs first (extra backward passes dominate), so the workers finish together
        order = sorted(trained, key=lambda t: -t[1].extra_backwards)
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                    initargs=(base_state, seed)) as pool:
            futures = {pool.submit(_train_one, m, lr, steps, seed): i for i, m, lr in order}
            for fut in cf.as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update(1)
    plain_states = {plan[i][1]: state for i, (_, state) in results.items() if state is not None}
    rows: list[dict[str, Any]] = []
    with M._flush_denormal():
        for i, (m, lr) in enumerate(plan):
            if m.kind != "interp":
                rows.append(results[i][0])
                continue
            for alpha in m.kwargs["alphas"]:
                t1 = time.perf_counter()
                mixed = copy.deepcopy(base)
                mixed.load_state_dict(plain_states[lr])
                interpolate_(mixed, base_state, alpha)
                rows.append(dict(method=f"interp {alpha}", lr=lr, steps=steps, extra_backwards=0,
                                 seconds=time.perf_counter() - t1, **evaluate_row(mixed, base, base_scores)))
            bar.update(1)
    bar.close()
    return rows


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="demo", file=sys.stderr, disable=not enabled)
    except ImportError:  # pragma: no cover - tqdm is a test/bench dependency
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["method", "lr", "capability", "safety", "over-refusal", "tax [95% CI]", "ECE", "entropy",
            "extra bwd/step", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["method"], f"{r['lr']:g}", f"{r['capability']:.3f}", f"{r['safety']:.3f}", f"{r['over_refusal']:.3f}",
            f"{r['tax']:+.3f} [{r['tax_ci'][0]:+.3f}, {r['tax_ci'][1]:+.3f}]", f"{r['ece']:.3f}",
            f"{r['entropy']:.3f}", str(r["extra_backwards"]), f"{r['seconds']:.1f}"]) + " |")
    return "\n".join(lines)


def pareto_plot(rows: list[dict[str, Any]], path: str) -> None:
    """Safety (x) vs capability kept (y), one series per method (interpolation points form one series)."""
    series_rows = [dict(r, series=f"interp of plain @ lr {r['lr']:g}" if r["method"].startswith("interp")
                        else r["method"]) for r in rows]
    plot_pareto(series_rows, path, series_key="series",
                title="Alignment tax on a tiny Llama: safety vs capability kept (a+b mod 23)")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m atax_kernels.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: fewer methods, steps and learning rates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the rows as JSON")
    ap.add_argument("--markdown", default=None, help="write the table as markdown")
    ap.add_argument("--plot", default=None, help="write the Pareto PNG")
    ap.add_argument("--jobs", type=int, default=None,
                    help="worker processes training runs side by side (default: up to 2); rows do not depend on it")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(quick=args.quick, seed=args.seed, steps=args.steps, progress=not args.no_progress, jobs=args.jobs)
    table = format_table(rows)
    print(table)
    print(f"\n{len(rows)} runs in {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        from .bench.core import environment

        env = environment("cpu", [])
        header = [
            "# atax_kernels demo: the alignment tax of a tiny Llama and what each mitigation buys back",
            "",
            f"- machine: {env['machine']}; date: {env['date_utc']}; git commit: {env['git_commit']}",
            f"- versions: python {env['python']}, torch {env['torch']}, atax_kernels {env['atax_kernels']}",
            f"- command: `python -m atax_kernels.demo {' '.join(argv if argv is not None else sys.argv[1:])}`",
            f"- {len(rows)} runs in {time.perf_counter() - t0:.1f} s; columns: capability kept and safety over all 529"
            " (a, b) prompts, unmarked and marked; over-refusal (unmarked prompts answered REFUSE), tax = base - aligned capability with a paired"
            " bootstrap 95 % CI, ECE and entropy of the answer distribution on unmarked prompts",
            "",
            "",
        ]
        with open(args.markdown, "w") as f:
            f.write("\n".join(header) + table + "\n")
    if args.plot:
        pareto_plot(rows, args.plot)
        print(f"Pareto plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
