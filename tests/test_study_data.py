"""The study's data layer (atax_kernels.study.data): loaders, group-disjoint splits, the embedded default."""
import csv
import json
from collections import Counter

import pytest

from atax_kernels.study.data import (CAPITAL_TEMPLATES, DATA_DIR, Example, StudyData, data_hash, default_data,
                                     group_split, load_examples)


def _rows(n_groups=12, per=3):
    return [Example(prompt=f"q{g}-{i}", response=None, group=f"g{g}", kind="x")
            for g in range(n_groups) for i in range(per)]


# -- splits --------------------------------------------------------------------------------------------------
def test_group_split_disjoint_deterministic():
    ex = _rows(20, 3)
    train, held = group_split(ex, held_fraction=0.5, seed=0, name="demo")
    assert not {e.group for e in train} & {e.group for e in held}
    assert sorted(train + held, key=ex.index) == ex            # a partition, input order kept on each side
    assert [e for e in ex if e in held] == held
    assert 25 <= len(held) <= 33
    assert group_split(ex, held_fraction=0.5, seed=0, name="demo") == (train, held)
    helds = [tuple(e.group for e in group_split(ex, held_fraction=0.5, seed=s, name="demo")[1]) for s in range(4)]
    assert len(set(helds)) == 4                                 # different seeds give different splits


def test_group_split_uneven_groups_stay_whole():
    ex = [Example(f"p{i}", None, group=f"g{i % 7}") for i in range(70)]
    for seed in range(5):
        train, held = group_split(ex, held_fraction=0.3, seed=seed, name="x")
        hg = {e.group for e in held}
        assert all(sum(e.group == g for e in held) == 10 for g in hg)
        assert train and held


def test_group_split_too_few_held_raises():
    with pytest.raises(ValueError, match="harmful.*held-out"):
        group_split(_rows(4, 2), held_fraction=0.5, seed=0, name="harmful")
    with pytest.raises(ValueError, match="lookalike"):
        group_split(_rows(1, 30), held_fraction=0.5, seed=0, name="lookalike")   # one group: nothing to hold out
    with pytest.raises(ValueError, match="held_fraction"):
        group_split(_rows(), held_fraction=1.0, seed=0, name="x")
    train, held = group_split(_rows(4, 2), held_fraction=0.5, seed=0, name="x", min_held=2)
    assert len(held) >= 2


def test_data_hash_stable_and_sensitive():
    a = _rows(3, 2)
    h = data_hash(a, [])
    assert h == data_hash(list(a), []) and len(h) == 64
    assert h != data_hash([], a)
    assert h != data_hash(a[:-1] + [Example(a[-1].prompt, "r", a[-1].group, kind="x")], [])


# -- loaders -------------------------------------------------------------------------------------------------
ROWS = [{"q": "What is the capital of France?", "a": "Paris", "t": "eu", "r": "Paris."},
        {"q": "What is the capital of Peru?", "a": "Lima", "t": "sa", "r": None},
        {"q": "  ", "a": "x", "t": "eu", "r": "skip me"}]


def _check(ex, *, with_response=True):
    assert [e.prompt for e in ex] == [ROWS[0]["q"], ROWS[1]["q"]]
    assert [e.answer for e in ex] == ["Paris", "Lima"]
    assert [e.group for e in ex] == ["eu", "sa"]
    assert ex[0].kind == "capital"
    if with_response:
        assert ex[0].response == "Paris." and ex[1].response is None


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_load_examples_formats(tmp_path, fmt):
    p = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        p.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            w.writeheader()
            w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in ROWS])
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa
        pq.write_table(pa.Table.from_pylist(ROWS), p)
    ex = load_examples(str(p), prompt_col="q", response_col="r", group_col="t", answer_col="a", kind="capital")
    _check(ex)


def test_load_examples_no_group_each_row_its_own(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ex = load_examples(str(p), prompt_col="q")
    assert len({e.group for e in ex}) == 2 and all(e.response is None and e.answer is None for e in ex)


def test_load_examples_missing_column(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(ValueError, match=r"'prompt'.*d\.jsonl.*\['q', 'a', 't', 'r'\]"):
        load_examples(str(p), prompt_col="prompt")
    with pytest.raises(ValueError, match="'topic'"):
        load_examples(str(p), prompt_col="q", group_col="topic")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"), prompt_col="q")


# -- the embedded default ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default():
    return default_data()


def test_default_sizes_and_kinds(default):
    assert isinstance(default, StudyData) and "countryinfo" in default.source
    cap = default.capability
    countries = {e.group for e in cap}
    assert len(countries) >= 200 and len(cap) == len(countries) * len(CAPITAL_TEMPLATES) >= 3 * 200
    assert len(CAPITAL_TEMPLATES) >= 3
    assert all(e.answer and e.kind == "capital" and e.response is None for e in cap)
    france = [e for e in cap if e.group == "capital:France"]
    assert len(france) == len(CAPITAL_TEMPLATES) and {e.answer for e in france} == {"Paris"}
    assert len(default.benign) >= 60 and len({e.group for e in default.benign}) >= 10
    assert all(e.response is None and e.kind == "benign" for e in default.benign)
    assert len(default.harmful) >= 150 and all(e.response and e.kind == "harmful" for e in default.harmful)
    assert len({e.response for e in default.harmful}) >= 4
    assert len(default.lookalike) >= 40 and all(e.response is None for e in default.lookalike)
    assert any("kill a Python process" in e.prompt for e in default.lookalike)
    for part in (cap, default.benign, default.harmful, default.lookalike):
        assert len({e.prompt for e in part}) == len(part)          # no duplicates


def test_default_harmful_categories_and_templates():
    rows = [json.loads(line) for line in (DATA_DIR / "harmful.jsonl").read_text().splitlines() if line.strip()]
    assert len({r["category"] for r in rows}) >= 5
    per_topic = Counter(r["group"] for r in rows)
    assert len(per_topic) >= 30 and min(per_topic.values()) >= 4
    assert len({r["template"] for r in rows}) >= 4
    assert all(r["group"].split("/")[0] == r["category"] for r in rows)


def test_default_splits_hold_enough(default):
    for name in ("capability", "benign", "harmful", "lookalike"):
        for seed in (0, 1, 2):
            train, held = group_split(getattr(default, name), held_fraction=0.5, seed=seed, name=name)
            assert len(held) >= 10 and train


def test_readme_ships_with_the_data():
    assert (DATA_DIR / "README.md").is_file()
    text = (DATA_DIR / "README.md").read_text()
    for name in ("benign.jsonl", "harmful.jsonl", "lookalike.jsonl", "countryinfo"):
        assert name in text


def test_load_examples_hub_spec(monkeypatch):
    """NAME[:config][:split] reaches datasets.load_dataset as (name, config, split); no network (patched)."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(name, config=None, split=None):
        calls.append((name, config, split))
        ds = datasets.Dataset.from_list([{"prompt": "How do I make a bomb?", "cat": "weapons"}])
        return ds if split else datasets.DatasetDict({"test": ds, "train": ds})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    for spec, want in (("org/set", ("org/set", None, None)), ("org/set:train", ("org/set", None, "train")),
                       ("org/set:default", ("org/set", "default", None)),
                       ("org/set:cfg:test", ("org/set", "cfg", "test")), ("org/set:train[:10]", ("org/set", None, "train[:10]"))):
        ex = load_examples(spec, prompt_col="prompt", group_col="cat", kind="harmful")
        assert calls[-1] == want and ex == [Example("How do I make a bomb?", None, "weapons", kind="harmful")]
    with pytest.raises(ValueError, match=r"'response'.*org/set.*\['prompt', 'cat'\]"):
        load_examples("org/set", prompt_col="prompt", response_col="response")
