"""The real-model study's grid: after :func:`~atax_kernels.study.prepare.prepare` (checks, model, data, base
generations, splits), for every learning rate x objective x seed x method: copy the base, safety-tune, score held
out -> rows (finished rows logged for ``--resume``, see :mod:`atax_kernels.study.resume`).

Everything that can be refused is refused before the first training step and before anything is written
(:class:`~atax_kernels.study.config.StudyError`): an output path that cannot be written, a missing model path, a
GGUF file without the ``gguf`` package, a tokenizer without a chat template (and no ``--template``), a dataset
without a named column, a split with fewer than 10 held-out examples, a base model that answers none of the
capability questions (:mod:`atax_kernels.study.checks`, :mod:`atax_kernels.study.prepare`).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from . import judge as J
from .config import StudyConfig, train_settings
from .methods import Method
from .prepare import encode_all, generate, prepare, progress_bar, subset, write_generation_cache
from .resume import fingerprint, load_done_rows, row_key, rows_path

__all__ = ["run_study"]

#: A fixed refusal per harmful prompt when the safety data has no response column (rotated by index).
DEFAULT_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request.",
    "Sorry, I won't provide help with that.",
    "I'm not able to help with that, as it could cause harm.",
)


def _barrier(world: int) -> None:
    """Wait for every rank (rank 0 scores while the others would start the next run)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _with_lora(model: torch.nn.Module, r: int) -> torch.nn.Module:
    """``model`` with PEFT LoRA adapters of rank ``r`` on its attention/MLP projections (else every Linear)."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in LORA_TARGETS if t in names] or "all-linear"
    conf = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, conf)



def _score(model, tok, eval_sets: dict[str, list], train_sets: dict[str, list], benign_tf: list, cfg: StudyConfig,
           gens: dict[str, list[str]] | None, progress: bool) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The held-out (and train-split) scores of one model from its generations (made here when ``gens`` is
    None) plus the teacher-forced drift on the benign answers; returns ``(row, gens)``."""
    from .scores import score_generations, teacher_forced
    from .train import batches

    if gens is None:
        order = [(k, e.prompt) for k in ("capability", "harmful", "benign", "lookalike") for e in eval_sets[k]]
        order += [("train_" + k, e.prompt) for k in ("capability", "harmful") for e in train_sets[k]]
        outs = generate(model, tok, [p for _, p in order], cfg, "scoring", progress)
        gens = {}
        for (k, _), g in zip(order, outs):
            gens.setdefault(k, []).append(g)
    held = {k: gens.get(k, []) for k in ("capability", "harmful", "benign", "lookalike")}
    train = {k: gens.get("train_" + k, []) for k in ("capability", "harmful")}
    row = score_generations(
        held, [e.answer for e in eval_sets["capability"]], is_refusal=J.is_refusal, answer_matches=J.answer_matches,
        token_ids=lambda s: tok(s, add_special_tokens=False)["input_ids"],
        train_gens=train, train_answers=[e.answer for e in train_sets["capability"]])
    device = next(model.parameters()).device
    row.update(teacher_forced(model, batches(benign_tf, cfg.gen_batch_size, tok.pad_token_id, device)))
    return row, gens


def _samples(eval_sets: dict[str, list], gens: dict[str, list[str]], n: int) -> list[dict[str, Any]]:
    """Up to ``n`` sampled generations per part (half as many capability ones) for the report."""

    out = []
    for k in ("harmful", "lookalike", "benign", "capability"):
        for e, g in list(zip(eval_sets[k], gens[k]))[:n if k != "capability" else max(1, n // 2) if n else 0]:
            d = {"part": k, "prompt": e.prompt, "output": g, "refusal": J.is_refusal(g)}
            if k == "capability":
                d["answer"], d["correct"] = e.answer, J.answer_matches(g, e.answer)
            out.append(d)
    return out


def run_study(cfg: StudyConfig, on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the study; returns the result dict (``rows``, ``setup``, ``config``). Raises StudyError on bad input.

    Loops run learning rate -> objective -> seed -> method, so an interrupted full study has every seed of the
    cells it finished (both objectives at the first learning rate first). Each finished row is appended to ``<json>.rows.jsonl`` (with a fingerprint of everything
    that changes the numbers); ``cfg.resume`` reuses the rows there instead of training them again.
    ``on_progress(result)`` is called on rank 0 after each finished training run with the rows so far
    (``result["runs_done"]`` of ``result["runs_total"]``), e.g. to write a partial report.
    """
    from .train import SafetySet, TrainConfig, reference_logps, train, train_trl

    t_wall = time.perf_counter()
    prep = prepare(cfg)
    rank, world, device = prep["rank"], prep["world"], prep["device"]
    model, tok, base_gens = prep["model"], prep["tok"], prep["base_gens"]
    show = cfg.progress and rank == 0
    # every check passed: now the cache may be written
    if not prep["cached"] and rank == 0:
        write_generation_cache(cfg, prep)
    methods: list[Method] = prep["methods"]
    trained = [m for m in methods if m.trains]
    n_runs = len(cfg.seeds) * len(cfg.objectives) * len(cfg.lrs) * len(trained)
    study_fingerprint = fingerprint(cfg, prep["dhash"])
    log_path = rows_path(cfg) if rank == 0 else None
    done = load_done_rows(log_path, study_fingerprint) if cfg.resume else {}
    if log_path is not None and not cfg.resume and log_path.exists():
        log_path.unlink()  # a fresh run: the old log would otherwise be resumed from later
    rows: list[dict[str, Any]] = []
    setup: dict[str, Any] = {"base_capability_accuracy": prep["base_acc"], "capability_kept_questions": len(prep["kept"]),
                             "capability_questions": len(prep["parts"].capability), "data_hash": prep["dhash"],
                             "sources": prep["parts"].source, "load_seconds": prep["load_seconds"],
                             "base_generation_seconds": prep["gen_seconds"], "base_generations_cached": prep["cached"],
                             "world_size": world, "device": device, "splits": {}, "parameters": sum(
                                 p.numel() for p in model.parameters())}
    runs_done = 0

    def result_so_far() -> dict[str, Any]:
        return {"config": asdict(cfg), "setup": setup, "rows": list(rows), "wall_seconds": time.perf_counter() - t_wall,
                "rank": rank, "world_size": world, "runs_done": runs_done, "runs_total": n_runs,
                "resumed_rows": sum(1 for r in rows if r.get("resumed"))}

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        if log_path is not None and not row.get("resumed"):
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as fh:
                fh.write(json.dumps({"fingerprint": study_fingerprint, "row": row}) + "\n")

    per_seed: dict[int, dict[str, Any]] = {}

    def seed_data(seed: int) -> dict[str, Any]:
        if seed in per_seed:
            return per_seed[seed]
        sp = prep["splits"][seed]
        eval_sets = {k: subset(sp[k][1], cfg.max_eval, seed, salt) for salt, k in
                     enumerate(("capability", "harmful", "benign", "lookalike"))}
        train_sets = {k: subset(sp[k][0], cfg.train_eval, seed, 10 + salt) for salt, k in
                      enumerate(("capability", "harmful"))}
        setup["splits"][str(seed)] = {k: {"train": len(v[0]), "held": len(v[1]), "scored": len(eval_sets[k])}
                                      for k, v in sp.items()}
        benign_tf = encode_all(tok, [(e.prompt, base_gens[e.prompt]) for e in eval_sets["benign"]], cfg)
        retain_pairs = [(e.prompt, base_gens[e.prompt]) for e in sp["capability"][0] + sp["benign"][0]]
        harm_train = sp["harmful"][0]
        refusals = [e.response if getattr(e, "response", None) else DEFAULT_REFUSALS[i % len(DEFAULT_REFUSALS)]
                    for i, e in enumerate(harm_train)]
        d = dict(eval_sets=eval_sets, train_sets=train_sets, benign_tf=benign_tf,
                 retain=encode_all(tok, retain_pairs, cfg), harm_train=harm_train, refusals=refusals,
                 # look-alikes the base itself refuses would teach refusing benign prompts: left out
                 lookalike_train=[e for e in sp["lookalike"][0] if not J.is_refusal(base_gens[e.prompt])],
                 lookalike_refused_by_base=sum(J.is_refusal(base_gens[e.prompt]) for e in sp["lookalike"][0]),
                 chosen=encode_all(tok, [(e.prompt, r) for e, r in zip(harm_train, refusals)], cfg), safety={})
        # the base row, from the cached generations (no generation of its own)
        if rank == 0:
            bg = {k: [base_gens[e.prompt] for e in eval_sets[k]] for k in ("capability", "harmful", "benign", "lookalike")}
            bg.update({"train_" + k: [base_gens[e.prompt] for e in train_sets[k]] for k in ("capability", "harmful")})
            row, _ = _score(model, tok, eval_sets, train_sets, benign_tf, cfg, bg, False)
            row.update(seed=seed, objective="-", lr=0.0, method="base", spec="base", family="base", kind="base",
                       extra_forward=0.0, extra_backward=0.0, seconds_per_step=0.0, refresh_seconds_per_step=0.0,
                       samples=_samples(eval_sets, bg, cfg.samples))
            rows.append(row)
        per_seed[seed] = d
        return d

    def preference_triples(d: dict[str, Any], lookalikes: str) -> list[tuple[str, str, str]]:
        """(prompt, chosen, rejected): harmful train -> refusal over the base's answer; with ``la=1``, each
        train look-alike -> the base's answer over a refusal; with ``la=nll``, each train look-alike -> the
        base's answer twice (an NLL row: its rejected side is not used)."""
        triples = [(e.prompt, r, base_gens[e.prompt]) for e, r in zip(d["harm_train"], d["refusals"])]
        if lookalikes == "1":
            triples += [(e.prompt, base_gens[e.prompt], DEFAULT_REFUSALS[i % len(DEFAULT_REFUSALS)])
                        for i, e in enumerate(d["lookalike_train"])]
        elif lookalikes == "nll":
            triples += [(e.prompt, base_gens[e.prompt], base_gens[e.prompt]) for e in d["lookalike_train"]]
        return triples

    def safety_for(d: dict[str, Any], objective: str, lookalikes: str) -> Any:
        if objective == "sft" and lookalikes == "nll":
            lookalikes = "1"  # an SFT row is an NLL row: the same data, built once
        key = (objective, lookalikes)
        if key not in d["safety"]:
            if objective == "sft":
                extra = [(e.prompt, base_gens[e.prompt]) for e in d["lookalike_train"]] if lookalikes != "0" else []
                safety = SafetySet(chosen=d["chosen"] + encode_all(tok, extra, cfg))
            else:
                triples = preference_triples(d, lookalikes)
                safety = SafetySet(chosen=encode_all(tok, [(p, c) for p, c, _ in triples], cfg),
                                   rejected=encode_all(tok, [(p, r) for p, _, r in triples], cfg))
                if lookalikes == "nll":
                    safety.nll_rows = torch.arange(len(triples)) >= len(d["harm_train"])
                safety.ref_chosen = reference_logps(model, safety.chosen, cfg.batch_size, tok.pad_token_id,
                                                    device).cpu()
                safety.ref_rejected = reference_logps(model, safety.rejected, cfg.batch_size, tok.pad_token_id,
                                                      device).cpu()
            d["safety"][key] = safety
        return d["safety"][key]

    outer = progress_bar(total=n_runs * cfg.steps, desc="study", unit="step", enable=show)
    for seed in cfg.seeds:
        seed_data(seed)  # base rows first, whatever the loop order
    for lr in cfg.lrs:
        for objective in cfg.objectives:
            use_trl = objective == "dpo" and cfg.dpo_impl == "trl"
            for seed in cfg.seeds:
                d = seed_data(seed)
                eval_sets, train_sets, benign_tf = d["eval_sets"], d["train_sets"], d["benign_tf"]

                def key_of(m: Method) -> dict[str, Any]:
                    return dict(seed=seed, objective=objective, lr=lr, method=m.name, spec=m.spec, family=m.family,
                                kind=m.kind)

                def reuse(m: Method) -> dict[str, Any] | None:
                    old = done.get(row_key(key_of(m)))
                    return None if old is None else {**old, "resumed": True}

                plain_state: dict[str, Any] | None = None
                for i, m in enumerate(methods):
                    key = key_of(m)
                    if m.kind == "interp":
                        old = reuse(m)
                        if old is not None and plain_state is None:
                            record(old)
                            continue
                        if plain_state is None:
                            continue
                        from ..interpolate import interpolate_

                        tuned = plain_state["model"]
                        interp = copy.deepcopy(tuned)
                        names = plain_state["start"]
                        interpolate_(interp, names, {n: float(m.get("a")) for n in names})
                        tr = plain_state["result"]
                        if rank == 0:
                            row, gens = _score(interp, tok, eval_sets, train_sets, benign_tf, cfg, None, show)
                            row.update(key, extra_forward=0.0, extra_backward=0.0,
                                       seconds_per_step=tr.seconds_per_step, refresh_seconds_per_step=0.0,
                                       steps=tr.steps, train_seconds=tr.seconds,
                                       notes=["the plain run's weights interpolated toward the base; its training "
                                              "cost is the plain row's"],
                                       samples=_samples(eval_sets, gens, cfg.samples))
                            record(row)
                        del interp
                        continue
                    plain_state = None  # its interpolations are done: free its weights
                    old = reuse(m)
                    # a plain run is reused only with every interpolation that follows it (they need its weights)
                    followers = []
                    for f in methods[i + 1:]:
                        if f.kind != "interp":
                            break
                        followers.append(f)
                    if old is not None and (m.kind != "plain" or all(reuse(f) is not None for f in followers)):
                        record(old)
                        runs_done += 1
                        outer.update(cfg.steps)
                        continue
                    safety = None if use_trl else safety_for(d, objective, m.lookalikes)
                    torch.manual_seed(seed)
                    tuned = copy.deepcopy(model)
                    if cfg.lora_r:
                        tuned = _with_lora(tuned, cfg.lora_r)
                    else:
                        for p in tuned.parameters():
                            p.requires_grad_(True)
                    start = {n: p.detach().clone() for n, p in tuned.named_parameters() if p.requires_grad} \
                        if m.kind == "plain" else None
                    fwd = tuned
                    if world > 1 and not use_trl:
                        from torch.nn.parallel import DistributedDataParallel as DDP

                        fwd = DDP(tuned, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
                    tcfg = TrainConfig(objective=objective, lr=lr, seed=seed, rank=rank, world_size=world,
                                       **train_settings(cfg))
                    outer.set_description(f"study: {objective} lr {lr:g} seed {seed} {m.name}")
                    if use_trl:
                        prefs = preference_triples(d, m.lookalikes)
                        tr = train_trl(tuned, model, m, prefs, d["retain"], tcfg, tok=tok, max_length=cfg.max_length,
                                       progress=outer)
                    else:
                        tr = train(tuned, model, m, safety, d["retain"], tcfg, pad_id=tok.pad_token_id,
                                   forward_model=fwd, progress=outer)
                    tuned.eval()
                    if rank == 0:
                        row, gens = _score(tuned, tok, eval_sets, train_sets, benign_tf, cfg, None, show)
                        row.update(key, extra_forward=tr.extra_forward, extra_backward=tr.extra_backward,
                                   seconds_per_step=tr.seconds_per_step,
                                   refresh_seconds_per_step=tr.refresh_seconds_per_step,
                                   setup_seconds=tr.setup_seconds, steps=tr.steps, train_seconds=tr.seconds,
                                   loss_first=tr.loss_first, loss_last=tr.loss_last,
                                   removed_fraction=tr.removed_fraction, basis_mib=tr.basis_mib,
                                   rank_mean=tr.rank_mean, refreshes=tr.refreshes,
                                   refresh_checks=tr.refresh_checks, notes=tr.notes + (
                                       [f"safety data: {len(d['harm_train'])} harmful train prompts refused + "
                                        f"{len(d['lookalike_train'])} train look-alikes answered as the base does "
                                        f"({'NLL rows' if m.lookalikes == 'nll' else 'rows of the objective'}) "
                                        f"({d['lookalike_refused_by_base']} the base refuses left out)"]
                                       if m.answers_lookalikes else []),
                                   samples=_samples(eval_sets, gens, cfg.samples))
                        record(row)
                    _barrier(world)
                    del fwd
                    runs_done += 1
                    if m.kind == "plain":
                        plain_state = {"model": tuned, "start": start, "result": tr}
                    else:
                        del tuned
                    if on_progress is not None and rank == 0 and runs_done < n_runs:
                        on_progress(result_so_far())
                plain_state = None
    outer.close()
    return result_so_far()
