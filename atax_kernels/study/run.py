"""The real-model study, end to end: checks -> model -> data -> base generations (cached) -> splits -> for every
learning rate x objective x seed x method: copy the base, safety-tune, score held out -> rows.

Everything that can be refused is refused before the first training step and before anything is written
(:class:`StudyError`): an output path that cannot be written, a missing model path, a GGUF file without the
``gguf`` package, a tokenizer without a chat template (and no ``--template``), a dataset without a named column,
a split with fewer than 10 held-out examples, a base model that answers none of the capability questions.

Base-model generations (every prompt of every part, greedy) are computed once and cached as JSON under
``<cache_dir>/generations/`` keyed by the model's identity (id or path, file sizes and times), the data hash,
the template, dtype, device type and the generation settings; the cache is written only once every check passed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .methods import QUICK_METHODS, Method, parse_methods

__all__ = ["StudyConfig", "StudyError", "run_study", "check_output_path", "MIN_HELD"]

MIN_HELD = 10
#: A fixed refusal per harmful prompt when the safety data has no response column (rotated by index).
DEFAULT_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request.",
    "Sorry, I won't provide help with that.",
    "I'm not able to help with that, as it could cause harm.",
)


class StudyError(Exception):
    """Bad input, found before any training step; the CLI prints it and exits with status 2."""


@dataclass
class StudyConfig:
    # model
    model: str | None = None
    gguf: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    template: str | None = None
    lora_r: int = 0
    cache_dir: str | None = None
    # data
    capability_data: str | None = None
    safety_data: str | None = None
    benign_data: str | None = None
    lookalike_data: str | None = None
    prompt_col: str = "prompt"
    response_col: str | None = None
    group_col: str | None = None
    answer_col: str | None = None
    capability_filter: str = "base"
    held_fraction: float = 0.5
    # grid
    objectives: tuple[str, ...] = ("sft",)
    lrs: tuple[float, ...] = (1e-5,)
    seeds: tuple[int, ...] = (0,)
    methods: str = QUICK_METHODS
    # training
    steps: int = 30
    batch_size: int = 8
    max_length: int = 128
    weight_decay: float = 0.0
    beta: float = 0.1
    refresh_every: int = 10
    basis_batches: int = 4
    backend: str | None = None
    dpo_impl: str = "own"
    # scoring
    max_eval: int = 48
    train_eval: int = 16
    max_new_tokens: int = 20
    gen_batch_size: int = 16
    samples: int = 2
    # outputs
    json: str | None = None
    markdown: str | None = None
    plot: str | None = None
    progress: bool = True
    tier: str = "custom"
    command: str = ""
    #: reuse the rows of an earlier, interrupted run of the same configuration (``<json>.rows.jsonl``)
    resume: bool = False


#: Config fields that do not change a row's numbers (outputs, the grid's extent, display): a resumed run may
#: differ in these and still reuse the rows it shares with the earlier one.
_NOT_IN_FINGERPRINT = ("json", "markdown", "plot", "progress", "tier", "command", "resume", "seeds", "lrs",
                       "objectives", "methods", "samples")


def rows_path(cfg: StudyConfig) -> Path | None:
    """Where finished rows are appended as they complete (so an interrupted study loses at most one run)."""
    return Path(str(cfg.json) + ".rows.jsonl") if cfg.json else None


def _fingerprint(cfg: StudyConfig, dhash: str) -> str:
    blob = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_FINGERPRINT}
    blob["data_hash"] = dhash
    blob["model_identity"] = _model_identity(cfg)
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _row_key(row: dict[str, Any]) -> tuple:
    return (int(row["seed"]), str(row["objective"]), float(row["lr"]), str(row["spec"]))


def _load_done_rows(path: Path | None, fingerprint: str) -> dict[tuple, dict[str, Any]]:
    if path is None or not path.is_file():
        return {}
    done: dict[tuple, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the interruption
            continue
        if rec.get("fingerprint") == fingerprint and isinstance(rec.get("row"), dict):
            done[_row_key(rec["row"])] = rec["row"]
    return done


# -- checks (nothing written) -----------------------------------------------------------------------------
def check_output_path(path: str | os.PathLike, what: str) -> Path:
    """Refuse an output path that cannot be written, without writing anything."""
    p = Path(path).expanduser()
    if p.exists() and p.is_dir():
        raise StudyError(f"{what} {str(path)!r} is a directory; give a file path")
    if p.exists() and not os.access(p, os.W_OK):
        raise StudyError(f"{what} {str(path)!r} cannot be written (no write permission)")
    anc = p.parent
    while not anc.exists():
        if anc == anc.parent:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise StudyError(f"{what} {str(path)!r} cannot be written: {str(anc)!r} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise StudyError(f"{what} {str(path)!r} cannot be written: no write permission in {str(anc)!r}")
    return p


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: absolute/relative/home paths, a .gguf file, or under an existing folder."""
    if name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf"):
        return True
    head = name.split("/")[0]
    return "/" in name and os.path.isdir(head)


def _check_model_args(cfg: StudyConfig) -> None:
    if cfg.gguf is not None:
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise StudyError(f"--gguf {cfg.gguf!r} needs the 'gguf' package to read GGUF files: "
                             f"pip install gguf (or pip install 'atax_kernels[study]')") from None
        gpath = Path(cfg.gguf).expanduser()
        if cfg.model is not None and not gpath.is_absolute():
            gpath = Path(cfg.model).expanduser() / gpath
        if not gpath.is_file():
            raise StudyError(f"--gguf {cfg.gguf!r}: no such file ({str(gpath)!r})")
    if cfg.model is not None and cfg.gguf is None:
        if _looks_local(cfg.model) and not Path(cfg.model).expanduser().exists():
            raise StudyError(f"--model {cfg.model!r}: no such file or directory")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise StudyError(f"--dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise StudyError(f"--device {cfg.device}: CUDA is not available on this machine")
    if cfg.lora_r:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise StudyError("--lora-r needs the 'peft' package: pip install peft") from None


def _check_numbers(cfg: StudyConfig) -> None:
    for key in ("steps", "batch_size", "max_length", "refresh_every", "basis_batches", "max_eval",
                "max_new_tokens", "gen_batch_size"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or v < 1:
            raise StudyError(f"--{key.replace('_', '-')} must be an integer >= 1, got {v!r}")
    for key in ("train_eval", "samples", "lora_r"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or v < 0:
            raise StudyError(f"--{key.replace('_', '-')} must be an integer >= 0, got {v!r}")
    if not 0.0 < cfg.held_fraction < 1.0:
        raise StudyError(f"--held-fraction must be in (0, 1), got {cfg.held_fraction}")
    if not cfg.lrs or any(not lr > 0 for lr in cfg.lrs):
        raise StudyError(f"--lr values must be > 0, got {cfg.lrs}")
    if not cfg.seeds:
        raise StudyError("give at least one --seed")
    bad = [o for o in cfg.objectives if o not in ("sft", "dpo")]
    if bad or not cfg.objectives:
        raise StudyError(f"--objective must be sft and/or dpo, got {cfg.objectives}")
    if cfg.dpo_impl not in ("own", "trl"):
        raise StudyError(f"--dpo-impl must be 'own' or 'trl', got {cfg.dpo_impl!r}")
    if cfg.capability_filter not in ("base", "none"):
        raise StudyError(f"--capability-filter must be 'base' or 'none', got {cfg.capability_filter!r}")


# -- data -------------------------------------------------------------------------------------------------
@dataclass
class Parts:
    capability: list
    benign: list
    harmful: list
    lookalike: list
    source: dict[str, str] = field(default_factory=dict)


def _load_parts(cfg: StudyConfig) -> Parts:
    from . import data as D

    specs = {"capability": cfg.capability_data, "harmful": cfg.safety_data, "benign": cfg.benign_data,
             "lookalike": cfg.lookalike_data}
    default = None
    out: dict[str, list] = {}
    source: dict[str, str] = {}
    for part, spec in specs.items():
        if spec is None:
            if default is None:
                default = D.default_data()
            out[part] = list(getattr(default, part))
            src = getattr(default, "source", None)
            if isinstance(src, dict):
                source[part] = src.get(part, "default")
            else:
                source[part] = "embedded default"
                source["default"] = str(src or "")
            continue
        kw: dict[str, Any] = dict(prompt_col=cfg.prompt_col, group_col=cfg.group_col, kind=part)
        if part == "capability":
            if cfg.answer_col is None:
                raise StudyError("--capability-data needs --answer-col (the column with the expected answer)")
            kw["answer_col"] = cfg.answer_col
        if part == "harmful":
            kw["response_col"] = cfg.response_col
        try:
            out[part] = list(D.load_examples(spec, **kw))
        except StudyError:
            raise
        except (KeyError, ValueError, OSError, TypeError, ImportError) as exc:
            raise StudyError(f"{part} data {spec!r}: {exc}") from None
        source[part] = spec
        if not out[part]:
            raise StudyError(f"{part} data {spec!r} has no rows")
    return Parts(out["capability"], out["benign"], out["harmful"], out["lookalike"], source)


def _split(part: list, name: str, cfg: StudyConfig, seed: int) -> tuple[list, list]:
    from . import data as D

    try:
        train, held = D.group_split(part, held_fraction=cfg.held_fraction, seed=seed, name=name, min_held=MIN_HELD)
    except ValueError as exc:
        raise StudyError(f"split of {name} (seed {seed}): {exc}") from None
    if len(held) < MIN_HELD:
        raise StudyError(f"split of {name} (seed {seed}): only {len(held)} held-out examples (< {MIN_HELD}); "
                         f"give more data or more groups, or raise --held-fraction")
    if not train:
        raise StudyError(f"split of {name} (seed {seed}): no train examples; lower --held-fraction")
    return list(train), list(held)


def _subset(rows: list, n: int, seed: int, salt: int) -> list:
    """At most ``n`` rows, a seeded random subset in the original order (held-out sets stay disjoint)."""
    if len(rows) <= n:
        return list(rows)
    idx = sorted(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 131 + salt))[:n].tolist())
    return [rows[i] for i in idx]


# -- model identity and the generation cache --------------------------------------------------------------
def _model_identity(cfg: StudyConfig) -> dict[str, Any]:
    from . import models as M

    ident: dict[str, Any] = {"model": cfg.model, "gguf": cfg.gguf, "template": cfg.template, "dtype": cfg.dtype,
                             "device": torch.device(cfg.device).type}
    if cfg.model is None and cfg.gguf is None:
        try:
            ident["default_gguf"] = [str(x) for x in M.default_gguf()]
        except Exception as exc:  # noqa: BLE001 - the identity only feeds a cache key
            ident["default_gguf"] = repr(exc)
    files: list[Path] = []
    for spec in (cfg.model, cfg.gguf):
        if spec and Path(spec).expanduser().exists():
            p = Path(spec).expanduser()
            files += [p] if p.is_file() else sorted(q for q in p.iterdir() if q.is_file())
    if "default_gguf" in ident and isinstance(ident["default_gguf"], list):
        p = Path(*ident["default_gguf"])
        if p.exists():
            files.append(p)
    ident["files"] = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    return ident


def _cache_root(cfg: StudyConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("ATAX_CACHE", Path.home() / ".cache" / "atax_kernels")) / "study"


def _gen_key(cfg: StudyConfig, dhash: str) -> str:
    blob = json.dumps({"model": _model_identity(cfg), "data": dhash, "max_new_tokens": cfg.max_new_tokens,
                       "v": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _generate(model, tok, prompts: list[str], cfg: StudyConfig, desc: str, progress: bool) -> list[str]:
    from . import models as M

    out: list[str] = []
    chunk = cfg.gen_batch_size * 4
    bar = _bar(total=len(prompts), desc=desc, unit="prompt", leave=False, enable=progress)
    for i in range(0, len(prompts), chunk):
        out += M.generate(model, tok, prompts[i:i + chunk], max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.gen_batch_size)
        bar.update(len(prompts[i:i + chunk]))
    bar.close()
    return out


def _bar(*, enable: bool, **kw: Any):
    from tqdm.auto import tqdm

    return tqdm(disable=not enable, dynamic_ncols=True, **kw)


# -- distributed ------------------------------------------------------------------------------------------
def _dist_setup(cfg: StudyConfig) -> tuple[int, int, str]:
    """(rank, world, device) under ``accelerate launch`` / ``torchrun`` (WORLD_SIZE > 1), else (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, cfg.device
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = cfg.device
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# -- LoRA ---------------------------------------------------------------------------------------------------
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _with_lora(model: torch.nn.Module, r: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in LORA_TARGETS if t in names] or "all-linear"
    conf = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, conf)


# -- the study ----------------------------------------------------------------------------------------------
def _encode_all(tok, pairs: Sequence[tuple[str, str]], cfg: StudyConfig) -> list[dict[str, list[int]]]:
    from . import models as M
    from .train import encode

    return [encode(tok, p, r, max_length=cfg.max_length, chat_pair=M.chat_pair) for p, r in pairs]


def prepare(cfg: StudyConfig) -> dict[str, Any]:
    """Every check, the model, the data, the base generations and the splits; raises StudyError, writes nothing
    (the generation cache is returned to be written by the caller once everything passed)."""
    _check_numbers(cfg)
    try:
        methods = parse_methods(cfg.methods)
    except ValueError as exc:
        raise StudyError(f"--methods: {exc}") from None
    if cfg.dpo_impl == "trl" and "dpo" in cfg.objectives:
        from .train import TRL_METHODS

        bad = [m.name for m in methods if m.kind not in TRL_METHODS + ("interp",)]
        if bad:
            raise StudyError(f"--dpo-impl trl runs {', '.join(TRL_METHODS)} (and interp) only; not {', '.join(bad)}")
        try:
            import trl  # noqa: F401
        except ImportError:
            raise StudyError("--dpo-impl trl needs the 'trl' package: pip install trl") from None
    for what, path in (("--json", cfg.json), ("--markdown", cfg.markdown), ("--plot", cfg.plot)):
        if path:
            check_output_path(path, what)
    _check_model_args(cfg)
    rank, world, device = _dist_setup(cfg)
    from . import data as D
    from . import judge as J
    from . import models as M

    t0 = time.perf_counter()
    try:
        model, tok = M.load_model(cfg.model, gguf=cfg.gguf, dtype=cfg.dtype, device=device,
                                  cache_dir=cfg.cache_dir, template=cfg.template)
    except StudyError:
        raise
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        raise StudyError(f"loading the model ({cfg.model or cfg.gguf or 'default GGUF'}): {exc}") from None
    load_seconds = time.perf_counter() - t0
    if not getattr(tok, "chat_template", None) and cfg.template is None:
        raise StudyError("the tokenizer has no chat template: pass --template (a Jinja chat template string or a "
                         "file holding one)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()

    parts = _load_parts(cfg)
    # splits of the parts that need no generation first: a too-small split is refused before generating
    for seed in cfg.seeds:
        for name in ("harmful", "benign", "lookalike"):
            _split(getattr(parts, name), name, cfg, seed)
    if True:  # capability rows are scored by exact match: every row needs its answer
        missing = [i for i, e in enumerate(parts.capability) if not getattr(e, "answer", None)]
        if missing:
            raise StudyError(f"capability data: {len(missing)} row(s) have no answer (row {missing[0]}); "
                             f"give --answer-col")
    dhash = D.data_hash(parts.capability, parts.benign, parts.harmful, parts.lookalike)

    # base generations, cached
    cache_path = _cache_root(cfg) / "generations" / f"{_gen_key(cfg, dhash)}.json"
    prompts = sorted({e.prompt for part in (parts.capability, parts.benign, parts.harmful, parts.lookalike)
                      for e in part})
    base_gens: dict[str, str] | None = None
    cached = False
    if cache_path.is_file():
        try:
            blob = json.loads(cache_path.read_text())
            if set(prompts) <= set(blob["generations"]):
                base_gens, cached = blob["generations"], True
        except (OSError, ValueError, KeyError):
            base_gens = None
    gen_seconds = 0.0
    if base_gens is None:
        t1 = time.perf_counter()
        outs = _generate(model, tok, prompts, cfg, "base generations", cfg.progress and rank == 0)
        base_gens = dict(zip(prompts, outs))
        gen_seconds = time.perf_counter() - t1

    # capability kept to the questions the base answers
    if cfg.capability_filter == "base":
        kept = [e for e in parts.capability if J.answer_matches(base_gens[e.prompt], e.answer)]
        base_acc = len(kept) / len(parts.capability)
        if not kept:
            raise StudyError(f"the base model answers none of the {len(parts.capability)} capability questions "
                             f"(judge.answer_matches), so there is no capability to keep; check the model, the "
                             f"template and --answer-col")
    else:
        kept = list(parts.capability)
        base_acc = sum(J.answer_matches(base_gens[e.prompt], e.answer) for e in parts.capability) / len(parts.capability)
    splits = {}
    for seed in cfg.seeds:
        s = {}
        for name, rows in (("capability", kept), ("harmful", parts.harmful), ("benign", parts.benign),
                           ("lookalike", parts.lookalike)):
            s[name] = _split(rows, name, cfg, seed)
        splits[seed] = s
    return dict(methods=methods, model=model, tok=tok, parts=parts, kept=kept, base_acc=base_acc,
                base_gens=base_gens, splits=splits, rank=rank, world=world, device=device, dhash=dhash,
                cache_path=cache_path, cached=cached, load_seconds=load_seconds, gen_seconds=gen_seconds)


def _score(model, tok, eval_sets: dict[str, list], train_sets: dict[str, list], benign_tf: list, cfg: StudyConfig,
           gens: dict[str, list[str]] | None, progress: bool) -> tuple[dict[str, Any], dict[str, list[str]]]:
    from . import judge as J
    from .scores import score_generations, teacher_forced
    from .train import batches

    if gens is None:
        order = [(k, e.prompt) for k in ("capability", "harmful", "benign", "lookalike") for e in eval_sets[k]]
        order += [("train_" + k, e.prompt) for k in ("capability", "harmful") for e in train_sets[k]]
        outs = _generate(model, tok, [p for _, p in order], cfg, "scoring", progress)
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
    from . import judge as J

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
        try:
            prep["cache_path"].parent.mkdir(parents=True, exist_ok=True)
            tmp = prep["cache_path"].with_suffix(".tmp")
            tmp.write_text(json.dumps({"config": {"model": cfg.model, "gguf": cfg.gguf,
                                                  "max_new_tokens": cfg.max_new_tokens},
                                       "generations": base_gens}, indent=0))
            os.replace(tmp, prep["cache_path"])
        except OSError as exc:  # a cache that cannot be written is not fatal
            print(f"warning: base generations not cached ({exc})")
    methods: list[Method] = prep["methods"]
    trained = [m for m in methods if m.trains]
    n_runs = len(cfg.seeds) * len(cfg.objectives) * len(cfg.lrs) * len(trained)
    fingerprint = _fingerprint(cfg, prep["dhash"])
    log_path = rows_path(cfg) if rank == 0 else None
    done = _load_done_rows(log_path, fingerprint) if cfg.resume else {}
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
                fh.write(json.dumps({"fingerprint": fingerprint, "row": row}) + "\n")

    per_seed: dict[int, dict[str, Any]] = {}

    def seed_data(seed: int) -> dict[str, Any]:
        if seed in per_seed:
            return per_seed[seed]
        sp = prep["splits"][seed]
        eval_sets = {k: _subset(sp[k][1], cfg.max_eval, seed, salt) for salt, k in
                     enumerate(("capability", "harmful", "benign", "lookalike"))}
        train_sets = {k: _subset(sp[k][0], cfg.train_eval, seed, 10 + salt) for salt, k in
                      enumerate(("capability", "harmful"))}
        setup["splits"][str(seed)] = {k: {"train": len(v[0]), "held": len(v[1]), "scored": len(eval_sets[k])}
                                      for k, v in sp.items()}
        benign_tf = _encode_all(tok, [(e.prompt, base_gens[e.prompt]) for e in eval_sets["benign"]], cfg)
        retain_pairs = [(e.prompt, base_gens[e.prompt]) for e in sp["capability"][0] + sp["benign"][0]]
        harm_train = sp["harmful"][0]
        refusals = [e.response if getattr(e, "response", None) else DEFAULT_REFUSALS[i % len(DEFAULT_REFUSALS)]
                    for i, e in enumerate(harm_train)]
        d = dict(eval_sets=eval_sets, train_sets=train_sets, benign_tf=benign_tf,
                 retain=_encode_all(tok, retain_pairs, cfg), harm_train=harm_train, refusals=refusals,
                 chosen=_encode_all(tok, [(e.prompt, r) for e, r in zip(harm_train, refusals)], cfg), safety={})
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

    def safety_for(d: dict[str, Any], objective: str, use_trl: bool) -> Any:
        if objective not in d["safety"]:
            safety = SafetySet(chosen=d["chosen"])
            if objective == "dpo" and not use_trl:
                safety.rejected = _encode_all(tok, [(e.prompt, base_gens[e.prompt]) for e in d["harm_train"]], cfg)
                safety.ref_chosen = reference_logps(model, d["chosen"], cfg.batch_size, tok.pad_token_id,
                                                    device).cpu()
                safety.ref_rejected = reference_logps(model, safety.rejected, cfg.batch_size, tok.pad_token_id,
                                                      device).cpu()
            d["safety"][objective] = safety
        return d["safety"][objective]

    outer = _bar(total=n_runs * cfg.steps, desc="study", unit="step", enable=show)
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
                    old = done.get(_row_key(key_of(m)))
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
                    safety = safety_for(d, objective, use_trl)
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
                    tcfg = TrainConfig(objective=objective, steps=cfg.steps, lr=lr, batch_size=cfg.batch_size,
                                       weight_decay=cfg.weight_decay, beta=cfg.beta, refresh_every=cfg.refresh_every,
                                       basis_batches=cfg.basis_batches, seed=seed, backend=cfg.backend, rank=rank,
                                       world_size=world)
                    outer.set_description(f"study: {objective} lr {lr:g} seed {seed} {m.name}")
                    if use_trl:
                        prefs = [(e.prompt, r, base_gens[e.prompt]) for e, r in zip(d["harm_train"], d["refusals"])]
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
                                   rank_mean=tr.rank_mean, refreshes=tr.refreshes, notes=tr.notes,
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
