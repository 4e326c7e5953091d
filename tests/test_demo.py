"""The end-to-end demo in its CI size: every method present, values in range, deterministic, and the
recommended recipe beats plain fine-tuning."""
from __future__ import annotations

import json

import pytest

from atax_kernels import demo


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("atax_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("ATAX_CACHE_DIR", str(cache))
    try:
        # pretrains and caches the base; trains in this process
        first = demo.run(quick=True, progress=False, log=lambda *_: None, jobs=1)
        # loads the cached base; trains in 2 worker processes (rows must not depend on that)
        second = demo.run(quick=True, progress=False, log=lambda *_: None, jobs=2)
    finally:
        mp.undo()
    return first, second


def test_every_method_reported_with_values_in_range(quick_runs, tmp_path):
    rows, _ = quick_runs
    names = {r["method"].split(" 0.")[0] if r["method"].startswith("interp") else r["method"] for r in rows}
    expected = {m.name for m in demo.methods(quick=True)}
    assert expected <= names | {"interp"}
    for r in rows:
        for key in ("capability", "safety", "over_refusal", "ece"):
            assert 0.0 <= r[key] <= 1.0, (r["method"], key, r[key])
        assert r["tax_ci"][0] <= r["tax"] <= r["tax_ci"][1]
        assert {"method", "capability", "safety", "lr"} <= set(r)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    assert len(json.loads(path.read_text())) == len(rows)


def test_two_runs_give_identical_numbers_in_and_out_of_worker_processes(quick_runs):
    first, second = quick_runs
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(first) == strip(second)


def test_recommended_recipe_keeps_more_capability_than_plain(quick_runs):
    rows, _ = quick_runs
    plain = {r["lr"]: r for r in rows if r["method"] == "plain"}
    rec = {r["lr"]: r for r in rows if r["method"] == "recommended"}
    lr = 3e-4
    # Measured (quick, seed 0, lr 3e-4): plain keeps 0.004-0.009 at safety 1.000; recommended 0.845-0.858 at
    # 1.000 (the ranges: two machines, AVX2 Xeon and AVX-512 EPYC).
    assert rec[lr]["safety"] >= plain[lr]["safety"] - 0.05
    assert rec[lr]["capability"] >= plain[lr]["capability"] + 0.4


def test_bad_jobs_is_a_clear_error():
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        demo.run(quick=True, progress=False, log=lambda *_: None, jobs=0)
