"""Study data: examples, loaders, group-disjoint splits and the embedded default data set.

An :class:`Example` is one user turn (plain text, no chat template) with an optional target response, a *group*
(topic / template / category) and, for capability questions, a short gold answer. Splits are disjoint by group,
so a held-out prompt is never a paraphrase of a training prompt.

The embedded default (:func:`default_data`, files in ``atax_kernels/study/data/``, see the README there):

- capability: capital-city questions built at load time from the third-party ``countryinfo`` package (every
  country with a capital, :data:`CAPITAL_TEMPLATES` phrasings each; group = the country, answer = the capital);
- benign: instructions written by the project (cooking, coding, math, writing, science, ...), grouped by topic;
  no response (the study fills in the base model's own answer);
- harmful: request-level harmful prompts written by the project (categories x topics x phrasing templates),
  grouped by topic, each with a short refusal written by the project; no harmful content anywhere;
- lookalike: benign look-alikes of harmful requests ("How do I kill a Python process?"), grouped by concept.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

DATA_DIR = Path(__file__).with_suffix("")  # atax_kernels/study/data/

#: phrasings of the capital-city question; ``{country}`` is the country's display name
CAPITAL_TEMPLATES: tuple[str, ...] = (
    "What is the capital of {country}?",
    "Name the capital city of {country}.",
    "{Country}'s capital is which city?",
    "Which city is the capital of {country}?",
)

# countryinfo's registered names that read badly inside a question
_DISPLAY_NAMES = {
    "Palestine, State of": "the State of Palestine",
    "Virgin Islands, British": "the British Virgin Islands",
    "Virgin Islands, U.S.": "the U.S. Virgin Islands",
    "Holy See (Vatican City State)": "the Holy See",
    "Saint Martin (French part)": "Saint Martin",
    "Sint Maarten (Dutch part)": "Sint Maarten",
    "The Bahamas": "the Bahamas",
    "The Gambia": "the Gambia",
}

# other spellings / names of the same city, accepted beside countryinfo's (joined with "|")
_CAPITAL_ALIASES = {
    "Kyiv": "Kiev",
    "Ulaanbaatar": "Ulan Bator",
    "Naypyidaw": "Nay Pyi Taw|Naypyitaw",
    "Nur-Sultan": "Astana",             # renamed back to Astana in 2022
    "Washington D.C.": "Washington",
}

_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".pq")


@dataclass(frozen=True)
class Example:
    prompt: str                 # user turn, plain text (no template)
    response: str | None        # target answer (refusal for harmful; base model's own answer for benign, filled later)
    group: str                  # topic/template/category: splits are disjoint by group
    answer: str | None = None   # short gold answer for exact-match questions; alternatives separated by "|"
    kind: str = ""              # "capital" | "benign" | "harmful" | "lookalike" (or the part name given)


@dataclass
class StudyData:
    capability: list[Example]   # capital-city questions (answer set)
    benign: list[Example]       # benign instructions (response None: the study fills in the base's answer)
    harmful: list[Example]      # harmful requests, response = a refusal written by the project
    lookalike: list[Example]    # benign look-alikes ("How do I kill a Python process?"), response None
    source: str                 # one line saying where the data came from


# -- the embedded default -----------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not a JSON object ({exc})") from None
    return rows


def _countries() -> list[tuple[str, str]]:
    """(registered name, capital) of every country in ``countryinfo`` with a capital, sorted by name."""
    try:
        from countryinfo import CountryInfo
    except ImportError:
        raise ImportError("the default capability data is built from the 'countryinfo' package: "
                          "pip install countryinfo (or pip install -e '.[study]')") from None
    try:
        table = CountryInfo.all()          # countryinfo >= 1.0: a classmethod
    except (TypeError, ValueError):
        table = CountryInfo().all()        # countryinfo 0.1: an instance method
    out = []
    for entry in table.values():
        name, cap = entry.get("name"), entry.get("capital")
        if isinstance(cap, (list, tuple)):
            cap = "|".join(str(c).strip() for c in cap if c and str(c).strip())
        elif isinstance(cap, str):
            cap = "|".join(c.strip() for c in cap.split(" / ") if c.strip())
        if name and cap:
            alts = cap.split("|")
            alts += [a for c in cap.split("|") for a in _CAPITAL_ALIASES.get(c, "").split("|") if a]
            out.append((str(name), "|".join(alts)))
    return sorted(set(out))


def capital_questions(templates: Iterable[str] = CAPITAL_TEMPLATES) -> list[Example]:
    """Capital-city questions from ``countryinfo``: one per (country, template); group = the country."""
    out = []
    for name, cap in _countries():
        country = _DISPLAY_NAMES.get(name, name)
        for t in templates:
            prompt = t.format(country=country, Country=country[:1].upper() + country[1:])
            out.append(Example(prompt=prompt, response=None, group=f"capital:{name}", answer=cap, kind="capital"))
    return out


def _examples_file(name: str, kind: str) -> list[Example]:
    rows = _read_jsonl(DATA_DIR / f"{name}.jsonl")
    return [Example(prompt=r["prompt"], response=r.get("response"), group=r["group"], answer=r.get("answer"),
                    kind=kind) for r in rows]


def default_data() -> StudyData:
    """The embedded default: capitals from ``countryinfo``; benign, harmful and look-alike prompts written by
    the project (``atax_kernels/study/data/*.jsonl``)."""
    cap = capital_questions()
    try:
        from importlib.metadata import version
        ci = f"countryinfo {version('countryinfo')}"
    except Exception:  # noqa: BLE001 - only a label
        ci = "countryinfo"
    return StudyData(
        capability=cap,
        benign=_examples_file("benign", "benign"),
        harmful=_examples_file("harmful", "harmful"),
        lookalike=_examples_file("lookalike", "lookalike"),
        source=(f"capability: capital-city questions built from {ci} ({len(CAPITAL_TEMPLATES)} phrasings per "
                f"country); benign, harmful (with refusals) and look-alike prompts written by the atax_kernels "
                f"project (atax_kernels/study/data/)"),
    )


# -- loading user data --------------------------------------------------------------------------------------
def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _read_local(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            blob = json.loads(text)
        except json.JSONDecodeError:  # JSON lines under a .json name
            return _read_jsonl(path)
        if isinstance(blob, dict):
            lists = [v for v in blob.values() if isinstance(v, list)]
            if "data" in blob and isinstance(blob["data"], list):
                blob = blob["data"]
            elif len(lists) == 1:
                blob = lists[0]
            elif lists and all(len(v) == len(lists[0]) for v in lists):  # column-oriented {"col": [...], ...}
                keys = [k for k, v in blob.items() if isinstance(v, list)]
                blob = [dict(zip(keys, vals)) for vals in zip(*(blob[k] for k in keys))]
        if not isinstance(blob, list) or not all(isinstance(r, dict) for r in blob):
            raise ValueError(f"{path}: expected a JSON list of objects (or JSON lines)")
        return blob
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return [dict(r) for r in csv.DictReader(f)]
    if suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            try:
                import pandas as pd
            except ImportError:
                raise ImportError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
            return pd.read_parquet(path).to_dict("records")
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unknown file type {suffix!r}; give .jsonl, .json, .csv or .parquet")


def _looks_like_path(spec: str) -> bool:
    return spec.lower().endswith(_FILE_SUFFIXES) or spec.startswith(("/", "./", "../", "~"))


def _read_hub(spec: str) -> list[dict[str, Any]]:
    """NAME[:config][:split] through ``datasets.load_dataset`` (default split: train, else the first)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{spec!r} is not a local file, and loading a Hugging Face dataset needs the 'datasets' "
                          f"package: pip install datasets") from None
    parts = re.split(r":(?![^\[]*\])", spec)          # colons inside a split slice ("train[:10]") stay
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"dataset spec {spec!r}: expected NAME[:config][:split]")
    name, config, split = parts[0], None, None
    if len(parts) == 2:
        head = parts[1].split("[")[0]
        if head in ("train", "test", "validation", "valid", "dev", "eval") or "[" in parts[1]:
            split = parts[1]
        else:
            config = parts[1] or None
    elif len(parts) == 3:
        config, split = parts[1] or None, parts[2] or None
    ds = datasets.load_dataset(name, config, split=split)
    if isinstance(ds, datasets.DatasetDict):
        key = "train" if "train" in ds else next(iter(ds))
        ds = ds[key]
    return ds.to_list()


def load_examples(spec: str, *, prompt_col: str, response_col: str | None = None, group_col: str | None = None,
                  answer_col: str | None = None, kind: str = "") -> list[Example]:
    """Examples from a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file or a Hugging Face dataset
    ``NAME[:config][:split]`` (``datasets`` imported only then).

    Columns are mapped by name; a missing column raises ``ValueError`` naming the column, the source and the
    columns it has. Without ``group_col`` each row is its own group. Rows with an empty prompt are skipped;
    empty responses/answers read as ``None``.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        rows, where = _read_local(path), str(path)
    elif path.exists():
        raise ValueError(f"{spec!r} is a directory; give a .jsonl/.json/.csv/.parquet file")
    elif _looks_like_path(spec):
        raise FileNotFoundError(f"data file {spec!r} does not exist")
    else:
        rows, where = _read_hub(spec), f"dataset {spec!r}"
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    for role, col in (("prompt", prompt_col), ("response", response_col), ("group", group_col),
                      ("answer", answer_col)):
        if col is not None and col not in columns:
            raise ValueError(f"{role} column {col!r} not found in {where}; it has columns {columns}")

    def text(v: Any) -> str | None:
        if _is_missing(v):
            return None
        s = str(v).strip()
        return s or None

    out = []
    for i, r in enumerate(rows):
        prompt = text(r.get(prompt_col))
        if prompt is None:
            continue
        group = text(r.get(group_col)) if group_col is not None else None
        out.append(Example(prompt=prompt, response=text(r.get(response_col)) if response_col else None,
                           group=group if group is not None else f"row-{i}",
                           answer=text(r.get(answer_col)) if answer_col else None, kind=kind))
    return out


# -- splits and hashes ------------------------------------------------------------------------------------
def group_split(examples: list[Example], *, held_fraction: float, seed: int, name: str,
                min_held: int = 10) -> tuple[list[Example], list[Example]]:
    """(train, held-out): whole groups, seeded and deterministic, each side in the input order.

    The sorted group names are shuffled by ``random.Random(seed)``; groups are moved to the held-out side until
    it holds at least ``held_fraction`` of the examples, always leaving at least one group for training.
    Raises ``ValueError`` naming ``name`` when there are fewer than two groups or the held-out side has fewer
    than ``min_held`` examples.
    """
    if not 0.0 < held_fraction < 1.0:
        raise ValueError(f"{name}: held_fraction must be in (0, 1), got {held_fraction}")
    sizes: dict[str, int] = {}
    for e in examples:
        sizes[e.group] = sizes.get(e.group, 0) + 1
    if len(sizes) < 2:
        raise ValueError(f"{name}: {len(examples)} examples in {len(sizes)} group(s); a group-disjoint split needs "
                         f"at least two groups (and >= {min_held} held-out examples)")
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    target = held_fraction * len(examples)
    held_groups: set[str] = set()
    n_held = 0
    for g in order[:-1]:
        if n_held >= target:
            break
        held_groups.add(g)
        n_held += sizes[g]
    if n_held < min_held:
        raise ValueError(f"{name}: only {n_held} held-out examples (< {min_held}) from {len(examples)} examples in "
                         f"{len(sizes)} groups at held_fraction {held_fraction}; give more data or more groups")
    train = [e for e in examples if e.group not in held_groups]
    held = [e for e in examples if e.group in held_groups]
    return train, held


def data_hash(*parts: list[Example]) -> str:
    """A stable sha256 (hex) over the parts' examples, in order (for caching base generations)."""
    blob = json.dumps([[asdict(e) for e in part] for part in parts], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
