"""pytest-benchmark view of the projection benchmark (not part of `make test`).

    .venv/bin/python -m pytest bench/test_bench_projection.py --benchmark-only
    ATAX_BENCH_SCALE=0.1 .venv/bin/python -m pytest bench/ --benchmark-only --benchmark-group-by=param:case

Shares its cases, data and implementations with `python -m atax_kernels.bench` (atax_kernels/bench/).
Small sizes by default (ATAX_BENCH_SCALE, default 0.01 of GPT-2 small = ~1.3 M elements in 148 tensors).
Every benchmark first checks its result against the seed reference, so a fast-but-wrong kernel fails.
"""

from __future__ import annotations

import os

import pytest
import torch

from atax_kernels.bench import baselines, cases, cli, impls, memory, timing

SCALE = float(os.environ.get("ATAX_BENCH_SCALE", "0.01"))
DEVICE = os.environ.get("ATAX_BENCH_DEVICE", "cpu")

CASES = [cases.Case("gpt2-small", d, k, SCALE, DEVICE) for d in ("fp32", "bf16") for k in (1, 4)]
IMPLS = [impls.SEED, impls.FOREACH] + [impls.atax_name(b) for b in impls.default_backends(DEVICE)]

_data_cache: dict[cases.Case, tuple] = {}


def _data(case: cases.Case):
    """grads, refs, pristine copy and the seed's result, built once per case."""
    if case not in _data_cache:
        _data_cache.clear()  # keep one case in memory at a time
        grads, refs = cases.make_data(case)
        pristine = [g.clone() for g in grads]
        baselines.seed_project_(grads, refs)
        seed_out = [g.clone() for g in grads]
        _data_cache[case] = (grads, refs, pristine, seed_out)
    return _data_cache[case]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.dtype}-k{c.k}")
def test_projection(benchmark, case, impl):
    grads, refs, pristine, seed_out = _data(case)
    fn = impls.impl_by_name(impl, case.k)

    def restore():
        torch._foreach_copy_(grads, pristine)

    restore()
    fn(grads, refs)
    err = impls.rel_err(grads, seed_out)
    assert err <= impls.TOLERANCE[case.dtype], f"{impl} differs from the seed: rel err {err:.2e}"

    benchmark.group = case.name
    benchmark.extra_info.update(numel=case.numel, min_traffic_bytes=case.min_traffic_bytes, rel_err=err)
    benchmark.pedantic(fn, args=(grads, refs), setup=restore, rounds=5, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("case", CASES[:1], ids=lambda c: f"{c.dtype}-k{c.k}")
def test_stream_floor(benchmark, case):
    floor = timing.StreamFloor(case.numel, case.device)
    benchmark.group = case.name
    benchmark.extra_info.update(bytes_per_call=floor.bytes_per_call)
    benchmark.pedantic(floor, rounds=10, warmup_rounds=2, iterations=1)


def test_cli_smoke(tmp_path, capsys):
    """The CLI end to end on a tiny case: table on stdout, JSON and markdown written, no mismatch."""
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = cli.main(
        ["--scale", "0.002", "--dtype", "fp32", "--k", "1", "--repeat", "1", "--warmup", "1",
         "--no-memory", "--no-progress", "--json", str(js), "--markdown", str(md), "--device", DEVICE]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "stream floor" in out and "seed (torch.cat)" in out
    assert js.exists() and "git commit" in md.read_text()


def test_gpt2_small_count():
    assert cases.GPT2_SMALL_NUMEL == 124_439_808
    assert len(cases.gpt2_small_shapes()) == 148


def test_memory_child_sees_the_seed_copies():
    """The fresh-process peak-RSS probe: the seed's torch.cat copies are visible (>= 2 gradient copies)."""
    case = cases.Case("gpt2-small", "fp32", 1, 0.05, "cpu")
    res = memory.run_memory_child(case, impls.SEED)
    assert "error" not in res, res
    assert res["peak_extra_bytes"] >= 2 * case.numel * 4, res
