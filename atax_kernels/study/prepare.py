"""Everything a study needs before its first training step: every check, the model, the data parts, the
base model's generations (cached on disk under ``<cache_dir>/generations/``, keyed by the model's identity, the
data hash and the generation settings) and the seeded train/held-out splits. Nothing is written here: the
generation cache is returned, to be written by the caller once every check passed."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .checks import check_methods, check_model_args, check_numbers, check_outputs
from .config import StudyConfig, StudyError

__all__ = ["MIN_HELD", "Parts", "prepare", "write_generation_cache", "subset", "model_identity", "generate",
           "progress_bar", "encode_all"]

MIN_HELD = 10


@dataclass
class Parts:
    """The four data parts (rows of :class:`~atax_kernels.study.data.Example`) and where each came from."""

    capability: list
    benign: list
    harmful: list
    lookalike: list
    source: dict[str, str] = field(default_factory=dict)


def load_parts(cfg: StudyConfig) -> Parts:
    """The four parts: each from its ``--*-data`` source, or from the embedded default data."""
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


def split_part(part: list, name: str, cfg: StudyConfig, seed: int) -> tuple[list, list]:
    """``(train, held)`` of one part, disjoint by group; refuses a held-out side under MIN_HELD rows."""
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


def subset(rows: list, n: int, seed: int, salt: int) -> list:
    """At most ``n`` rows, a seeded random subset in the original order (held-out sets stay disjoint)."""
    if len(rows) <= n:
        return list(rows)
    idx = sorted(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 131 + salt))[:n].tolist())
    return [rows[i] for i in idx]


def model_identity(cfg: StudyConfig) -> dict[str, Any]:
    """What names the model's weights: its id or paths, the files' sizes and times, template, dtype, device type."""
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
    blob = json.dumps({"model": model_identity(cfg), "data": dhash, "max_new_tokens": cfg.max_new_tokens,
                       "v": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def generate(model, tok, prompts: list[str], cfg: StudyConfig, desc: str, progress: bool) -> list[str]:
    """Greedy generations of ``prompts``, in chunks, with a progress bar."""
    from . import models as M

    out: list[str] = []
    chunk = cfg.gen_batch_size * 4
    bar = progress_bar(total=len(prompts), desc=desc, unit="prompt", leave=False, enable=progress)
    for i in range(0, len(prompts), chunk):
        out += M.generate(model, tok, prompts[i:i + chunk], max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.gen_batch_size)
        bar.update(len(prompts[i:i + chunk]))
    bar.close()
    return out


def progress_bar(*, enable: bool, **kw: Any):
    """A tqdm bar (``kw`` as tqdm takes them), hidden unless ``enable``."""
    from tqdm.auto import tqdm

    return tqdm(disable=not enable, dynamic_ncols=True, **kw)


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


def encode_all(tok, pairs: Sequence[tuple[str, str]], cfg: StudyConfig) -> list[dict[str, list[int]]]:
    """Every ``(prompt, response)`` pair encoded for training (labels on the response only)."""
    from . import models as M
    from .train import encode

    return [encode(tok, p, r, max_length=cfg.max_length, chat_pair=M.chat_pair) for p, r in pairs]


def prepare(cfg: StudyConfig) -> dict[str, Any]:
    """Every check, the model, the data, the base generations and the splits; raises StudyError, writes nothing
    (the generation cache is returned to be written by the caller once everything passed)."""
    check_numbers(cfg)
    methods = check_methods(cfg)
    check_outputs(cfg)
    check_model_args(cfg)
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

    parts = load_parts(cfg)
    # splits of the parts that need no generation first: a too-small split is refused before generating
    for seed in cfg.seeds:
        for name in ("harmful", "benign", "lookalike"):
            split_part(getattr(parts, name), name, cfg, seed)
    # capability rows are scored by exact match: every row needs its answer
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
        outs = generate(model, tok, prompts, cfg, "base generations", cfg.progress and rank == 0)
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
            s[name] = split_part(rows, name, cfg, seed)
        splits[seed] = s
    return dict(methods=methods, model=model, tok=tok, parts=parts, kept=kept, base_acc=base_acc,
                base_gens=base_gens, splits=splits, rank=rank, world=world, device=device, dhash=dhash,
                cache_path=cache_path, cached=cached, load_seconds=load_seconds, gen_seconds=gen_seconds)


def write_generation_cache(cfg: StudyConfig, prep: dict[str, Any]) -> None:
    """Write :func:`prepare`'s base generations to its cache path (atomically; a failure only warns). Called
    once every check passed, on rank 0, when they were not read from the cache."""
    try:
        prep["cache_path"].parent.mkdir(parents=True, exist_ok=True)
        tmp = prep["cache_path"].with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": {"model": cfg.model, "gguf": cfg.gguf,
                                              "max_new_tokens": cfg.max_new_tokens},
                                   "generations": prep["base_gens"]}, indent=0))
        os.replace(tmp, prep["cache_path"])
    except OSError as exc:  # a cache that cannot be written is not fatal
        print(f"warning: base generations not cached ({exc})")
