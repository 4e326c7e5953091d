"""``ops.remove_span_`` (ΔW <- ΔW - (ΔW U) Uᵀ) on every backend against a float64 oracle.

Triton runs under TRITON_INTERPRET=1 on CPU tensors (small shapes). Tolerances are relative to ‖ΔW‖.
"""
from __future__ import annotations

import pytest
import torch

from atax_kernels.ops import remove_span_
from conftest import backends_under_test

BACKENDS = backends_under_test()
F64 = torch.float64
# error of the result relative to ‖ΔW‖: fp32 products; bf16/fp16 add one output rounding (2^-8 / 2^-11)
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _orth(d_in: int, r: int, gen: torch.Generator) -> torch.Tensor:
    if r == 0:
        return torch.zeros(d_in, 0, dtype=F64)
    return torch.linalg.qr(torch.randn(d_in, r, dtype=F64, generator=gen))[0]


def _make_target(d_out: int, d_in: int, dtype, layout: str, gen, device) -> torch.Tensor:
    """A [d_out, d_in] tensor in one of the layouts a caller may pass."""
    if layout == "contiguous":
        t = torch.randn(d_out, d_in, generator=gen)
    elif layout == "transposed":  # GPT-2 Conv1D: weight [d_in, d_out], ΔW = weight.t()
        t = torch.randn(d_in, d_out, generator=gen).t()
    elif layout == "strided":  # neither dimension unit-stride
        t = torch.randn(d_out, 2 * d_in, generator=gen)[:, ::2]
    elif layout == "offset":  # storage offset 1: breaks 16-byte alignment
        t = torch.randn(d_out * d_in + 1, generator=gen)[1:].view(d_out, d_in)
    else:
        raise AssertionError(layout)
    if dtype != torch.float32 or device.type != "cpu":
        # keep the layout: convert through a buffer of the same strides
        out = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device) if layout != "offset" else \
            torch.empty(d_out * d_in + 1, dtype=dtype, device=device)[1:].view(d_out, d_in)
        out.copy_(t)
        t = out
    return t


def _oracle(w: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, float, float]:
    w64 = w.detach().cpu().to(F64)
    if u is None or u.shape[1] == 0:
        return w64.clone(), float((w64 ** 2).sum()), 0.0
    u64 = u.detach().cpu().to(F64)
    p = w64 @ u64
    return w64 - p @ u64.T, float((w64 ** 2).sum()), float((p ** 2).sum())


def _check(targets, bases, stats, expected, dtypes):
    assert stats.dtype == F64 and tuple(stats.shape) == (len(targets), 2)
    stats = stats.cpu()
    for i, (t, (ref, before, removed)) in enumerate(zip(targets, expected)):
        tol = TOL[dtypes[i]]
        norm = before ** 0.5
        err = float((t.detach().cpu().to(F64) - ref).norm())
        assert err <= tol * norm + 1e-30, (i, err, norm)
        assert abs(float(stats[i, 0]) - before) <= 1e-5 * before + 1e-30, (i, float(stats[i, 0]), before)
        assert abs(float(stats[i, 1]) - removed) <= 2 * tol * before + 1e-30, (i, float(stats[i, 1]), removed)


# shapes (d_out, d_in, r): one row-block of a few rows, r > d_out, r = 0, r = d_in, odd sizes
CASES = [(7, 13, 3), (40, 24, 5), (5, 33, 20), (19, 16, 0), (12, 16, 16), (1, 9, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided", "offset"])
def test_matches_float64_oracle(backend, dtype, layout, device):
    gen = torch.Generator().manual_seed(1)
    dt = DTYPES[dtype]
    targets = [_make_target(d_out, d_in, dt, layout, gen, device) for d_out, d_in, _ in CASES]
    bases = [_orth(d_in, r, gen).to(torch.float32).to(device) for _, d_in, r in CASES]
    expected = [_oracle(t, u) for t, u in zip(targets, bases)]
    strides = [t.stride() for t in targets]
    stats = remove_span_(targets, bases, backend=backend)
    _check(targets, bases, stats, expected, [dt] * len(targets))
    assert [t.stride() for t in targets] == strides  # updated in place, not rebound


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_rank_basis_removes_everything(backend, device):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(20, 24, generator=gen).to(device)
    before = float((w.double() ** 2).sum())
    stats = remove_span_([w], [_orth(24, 24, gen).float().to(device)], backend=backend)
    assert float(w.double().norm()) <= 1e-5 * before ** 0.5
    assert abs(float(stats[0, 1]) - before) <= 1e-5 * before


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_basis_none_and_low_precision_basis(backend, device):
    gen = torch.Generator().manual_seed(3)
    u = _orth(16, 6, gen).to(torch.bfloat16).to(device)  # bf16 basis: nearly orthonormal, oracle uses it as is
    u_before = u.clone()
    qkv = [torch.randn(10, 16, generator=gen).to(device) for _ in range(3)]
    skipped = torch.randn(4, 16, generator=gen).to(device)
    skipped_before = skipped.clone()
    targets = qkv + [skipped]
    bases = [u, u, u, None]
    expected = []
    for t in qkv:
        w64, u64 = t.cpu().double(), u.cpu().double()
        p = w64 @ u64
        expected.append((w64 - p @ u64.T, float((w64 ** 2).sum()), float((p ** 2).sum())))
    expected.append(_oracle(skipped, None))
    stats = remove_span_(targets, bases, backend=backend)
    _check(targets, bases, stats, expected, [torch.float32] * 4)
    assert torch.equal(skipped, skipped_before)  # None: bit-for-bit untouched
    assert torch.equal(u, u_before)
    assert float(stats[3, 1]) == 0.0


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_block_boundaries_and_large_rank(backend, device):
    # cpu blocks: 256 KB of fp32 rows for r <= 256 (1024 rows at d_in = 64), <= 8 MB above; r <= 128 takes
    # the AVX-512 microkernels where the CPU has them, 128 < r takes BLAS (both layouts of each)
    gen = torch.Generator().manual_seed(4)
    # 1000 rows at d_in = 2100, r = 260: two blocks of the large-rank path (<= 8 MB of fp32 rows each)
    shapes = [(1100, 64, 8), (300, 300, 290), (513, 40, 40), (70, 200, 150), (1000, 2100, 260)]
    targets = [_make_target(o, i, torch.float32, "transposed" if k % 2 else "contiguous", gen, device)
               for k, (o, i, _) in enumerate(shapes)]
    bases = [_orth(i, r, gen).float().to(device) for _, i, r in shapes]
    expected = [_oracle(t, u) for t, u in zip(targets, bases)]
    stats = remove_span_(targets, bases, backend=backend)
    _check(targets, bases, stats, expected, [torch.float32] * len(shapes))


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_cpu_blas_path_without_avx512(layout, monkeypatch):
    """The path CPUs without AVX-512 take for r <= 128 (forced here with ATAX_CPU_NO_AVX512=1)."""
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend unavailable")
    monkeypatch.setenv("ATAX_CPU_NO_AVX512", "1")
    gen = torch.Generator().manual_seed(12)
    shapes = [(100, 48, 8), (9, 30, 30), (40, 24, 5)]
    cpu = torch.device("cpu")
    for dt in (torch.float32, torch.bfloat16):
        targets = [_make_target(o, i, dt, layout, gen, cpu) for o, i, _ in shapes]
        bases = [_orth(i, r, gen).float() for _, i, r in shapes]
        expected = [_oracle(t, u) for t, u in zip(targets, bases)]
        stats = remove_span_(targets, bases, backend="cpu")
        _check(targets, bases, stats, expected, [dt] * len(shapes))


def test_triton_large_rank_falls_back_to_torch(device):
    if "triton" not in BACKENDS:
        pytest.skip("triton backend unavailable")
    from atax_kernels.ops.triton import remove_span as trs

    gen = torch.Generator().manual_seed(5)
    r = trs.MAX_RANK + 7
    targets = [torch.randn(6, r + 3, generator=gen).to(device), torch.randn(9, 20, generator=gen).to(device)]
    bases = [_orth(r + 3, r, gen).float().to(device), _orth(20, 4, gen).float().to(device)]
    expected = [_oracle(t, u) for t, u in zip(targets, bases)]
    stats = remove_span_(targets, bases, backend="triton")
    _check(targets, bases, stats, expected, [torch.float32] * 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_lists(backend, device):
    out = remove_span_([], [], backend=backend)
    assert out.dtype == F64 and tuple(out.shape) == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_targets(backend, device):
    targets = [torch.zeros(0, 5, device=device), torch.zeros(4, 0, device=device)]
    stats = remove_span_(targets, [torch.zeros(5, 2, device=device), torch.zeros(0, 0, device=device)],
                         backend=backend)
    assert torch.equal(stats.cpu(), torch.zeros(2, 2, dtype=F64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, device):
    gen = torch.Generator().manual_seed(6)
    shapes = [(70, 48, 12), (33, 20, 5)]
    w0 = [torch.randn(o, i, generator=gen).to(device) for o, i, _ in shapes]
    bases = [_orth(i, r, gen).float().to(device) for _, i, r in shapes]
    runs = []
    for _ in range(2):
        ws = [w.clone() for w in w0]
        runs.append((ws, remove_span_(ws, bases, backend=backend)))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert torch.equal(runs[0][1], runs[1][1])


def test_cpu_same_bits_at_one_and_two_threads():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend unavailable")
    gen = torch.Generator().manual_seed(7)
    # several blocks per target (1100 rows at d_in = 64 -> 2 blocks), a transposed view, a large-rank target
    shapes = [(1100, 64, 8), (600, 48, 16), (300, 300, 290), (70, 200, 150), (1000, 2100, 260)]
    w0 = [torch.randn(o, i, generator=gen) for o, i, _ in shapes]
    w0[1] = torch.randn(48, 600, generator=gen).t()
    bases = [_orth(i, r, gen).float() for _, i, r in shapes]
    old = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ws = [w.clone() for w in w0]
            out.append((ws, remove_span_(ws, bases, backend="cpu")))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(out[0][0], out[1][0]))
    assert torch.equal(out[0][1], out[1][1])


def _bad_cases(device):
    """(name, targets, bases, exception, message fragment); targets[0] is valid and would be written."""
    gen = torch.Generator().manual_seed(8)

    def w(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    u8 = _orth(8, 3, gen).float().to(device)
    base = w(6, 8)
    yield "d_in mismatch", [w(5, 8), w(4, 7)], [u8, u8], ValueError, "bases[1] has shape (8, 3) but targets[1] has shape (4, 7)"
    yield "lengths differ", [w(5, 8), w(5, 8)], [u8], ValueError, "targets has 2 tensors but bases has 1"
    yield "target 1-D", [w(5, 8), w(8)], [u8, None], ValueError, "targets[1] has shape (8,)"
    yield "target 3-D", [w(5, 8), w(2, 5, 8)], [u8, u8], ValueError, "targets[1] has shape (2, 5, 8)"
    yield "basis 3-D", [w(5, 8), w(5, 8)], [u8, u8[None]], ValueError, "bases[1] has shape (1, 8, 3)"
    yield "basis 1-D", [w(5, 8), w(5, 8)], [u8, u8[:, 0]], ValueError, "bases[1] has shape (8,)"
    yield "r > d_in", [w(5, 8), w(5, 2)], [u8, w(2, 3)], ValueError, "cannot exceed d_in"
    yield "int target", [w(5, 8), torch.ones(5, 8, dtype=torch.int32, device=device)], [u8, u8], TypeError, "targets[1]"
    yield "int basis", [w(5, 8), w(5, 8)], [u8, torch.ones(8, 3, dtype=torch.int64, device=device)], TypeError, "bases[1]"
    yield "basis not a tensor", [w(5, 8), w(5, 8)], [u8, [[1.0]]], TypeError, "bases[1]"
    yield "target not a tensor", [w(5, 8), "x"], [u8, None], TypeError, "targets[1]"
    yield "basis on another device", [w(5, 8), w(5, 8)], [u8, torch.empty(8, 3, device="meta")], ValueError, \
        "bases[1] is on meta"
    yield "target on another device", [w(5, 8), torch.empty(5, 8, device="meta")], [u8, None], ValueError, \
        "targets[1] is on meta"
    yield "targets overlap", [base, base[2:4]], [u8, u8], ValueError, "targets[0] and targets[1] overlap"
    yield "basis overlaps a target", [w(5, 8), base], [u8, base.t()[:, :3]], ValueError, "bases[1] overlaps targets[1]"
    yield "requires grad", [w(5, 8), w(5, 8).requires_grad_()], [u8, u8], ValueError, "targets[1] requires grad"
    yield "targets a tensor", w(5, 8), [u8], TypeError, "targets must be a sequence"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c[0] for c in _bad_cases(torch.device("cpu"))])
def test_bad_input_raises_before_any_write(backend, case, device):
    name, targets, bases, exc, fragment = next(c for c in _bad_cases(device) if c[0] == case)
    listed = targets if isinstance(targets, list) else [targets]
    before = [t.detach().clone() if isinstance(t, torch.Tensor) and t.device.type != "meta" else None
              for t in listed]
    with pytest.raises(exc) as info:
        remove_span_(targets, bases, backend=backend)
    assert fragment in str(info.value), str(info.value)
    for t, b in zip(listed, before):
        if b is not None:
            assert torch.equal(t.detach(), b), f"{name}: a target was modified before the error"


def test_default_backend_on_cpu_is_the_cpp_kernel():
    from atax_kernels.ops import remove_span as rs
    from atax_kernels.ops.registry import resolve_remove_span

    impl = resolve_remove_span(None, torch.device("cpu"), {torch.float32})
    if "cpu" in BACKENDS and rs.remove_span_present():
        assert impl is rs.remove_span_cpp
    else:
        assert impl is rs.remove_span_torch
    assert resolve_remove_span("torch", torch.device("cpu"), {torch.float32}) is rs.remove_span_torch
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_remove_span("nope", torch.device("cpu"), {torch.float32})


# ----------------------------------------------------------------------------- opcheck
def _opcheck_samples():
    gen = torch.Generator().manual_seed(9)
    u = _orth(12, 4, gen).float()
    ws = [torch.randn(7, 12, generator=gen), torch.randn(12, 5, generator=gen).t(),  # Conv1D-style view
          torch.randn(3, 12, generator=gen).to(torch.bfloat16)]
    return ws, [u, None, u]


def test_opcheck_cpu():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend unavailable")
    from atax_kernels.ops import remove_span as rs

    assert rs.remove_span_present()
    ws, bases = _opcheck_samples()
    torch.library.opcheck(torch.ops.atax.remove_span_.default, (ws, bases))


def test_opcheck_triton():
    if "triton" not in BACKENDS:
        pytest.skip("triton backend unavailable")
    import atax_kernels.ops.triton.remove_span  # noqa: F401  (registers the op)

    ws, bases = _opcheck_samples()
    torch.library.opcheck(torch.ops.atax_triton.remove_span_.default, (ws, bases))


# ----------------------------------------------------------------------------- benchmark CLI
def test_bench_cli_end_to_end(tmp_path, capsys):
    """`python -m atax_kernels.bench remove-span` at tiny size (timing is never asserted)."""
    import json
    import re

    from atax_kernels.bench import cli

    md, js = tmp_path / "rs.md", tmp_path / "rs.json"
    rc = cli.main(["remove-span", "--div", "64", "--gpt2-layers", "1", "--llama-layers", "1", "--ranks", "4,16",
                    "--dtype", "fp32,bf16", "--repeat", "1", "--no-progress", "--markdown", str(md),
                    "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    text = md.read_text()
    assert "git commit" in text and "stream triad" in text
    records = json.loads(js.read_text())["records"]
    impls = {r["impl"] for r in records}
    assert {"torch.matmul x2", "atax[torch]"} <= impls, impls
    assert {r["set"] for r in records} == {"gpt2-small", "llama-7b x1 layers"}
    for rec in records:  # every implementation agrees with the float64 oracle
        assert rec["rel_err"] < (1e-5 if rec["dtype"] == "fp32" else 2e-2), rec
        assert rec["ms_min"] > 0 and rec["roofline_ms"] > 0
    assert re.search(r"\| gpt2-small \| bf16 \| 16 \| atax\[torch\] \| [0-9.]+ \|", text)
