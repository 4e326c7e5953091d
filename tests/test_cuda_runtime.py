"""Runtime tests of the C++/CUDA kernels (atax::gram, atax::combine_ on the CUDA dispatch key).

Only run where torch.cuda.is_available() and the extension was built with CUDA kernels
(`make gpu-check` runs them). Self-contained: the oracle is float64 torch on the same tensors.
"""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(scope="module", autouse=True)
def _cuda_ext():
    from atax_kernels import _ext

    _ext.load()
    if not torch._C._dispatch_has_kernel_for_dispatch_key("atax::gram", "CUDA"):
        pytest.skip(f"atax CUDA kernels not built: {_ext.build_info()}")


# ----------------------------------------------------------------------------- helpers
def _gram(vectors, per_tensor):
    m = len(vectors)
    flat = [t for lst in vectors for t in lst]
    return torch.ops.atax.gram(flat, m, per_tensor)


def _combine(target, vectors, coefs):
    flat = [t for lst in vectors for t in lst]
    torch.ops.atax.combine_(target, flat, coefs)


def _make(shape, dtype, kind="plain", gen=None, scale=1.0):
    """kind: plain | misaligned (storage offset 1) | noncontig (a strided view)."""
    numel = math.prod(shape)
    if kind == "plain":
        return (torch.randn(shape, generator=gen) * scale).to(dtype).to(DEV)
    if kind == "misaligned":
        buf = (torch.randn(numel + 1, generator=gen) * scale).to(dtype).to(DEV)
        return buf[1:].view(shape)
    if kind == "noncontig":
        big = (torch.randn(*shape, 2, generator=gen) * scale).to(dtype).to(DEV)
        t = big[..., 1]
        assert t.numel() == 0 or not t.is_contiguous() or numel <= 1
        return t
    raise ValueError(kind)


def _ref_gram(vectors, per_tensor):
    m, n = len(vectors), len(vectors[0])
    per = []
    for i in range(n):
        v = torch.stack([vectors[j][i].reshape(-1).double() for j in range(m)])  # [m, N_i]
        per.append(v @ v.T)
    g = torch.stack(per)
    return g if per_tensor else g.sum(0)


def _assert_gram_close(out, ref, rtol=2e-5):
    ref = ref.to(out.device)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    d = torch.diagonal(ref, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    scale = d.unsqueeze(-1) * d.unsqueeze(-2)  # ||a|| ||b|| (tolerance relative to norms)
    err = (out - ref).abs()
    assert torch.all(err <= rtol * scale + 1e-30), f"max err {err.max().item()}, scale {scale.max().item()}"
    assert torch.equal(out, out.transpose(-1, -2))


def _eps(dtype):
    return {F32: 2.0**-23, BF16: 2.0**-8, F16: 2.0**-11}[dtype]


def _ref_combine(target, vectors, coefs):
    """float64 result (skipping zero coefficients) and a magnitude bound for the tolerance."""
    n, k = len(target), len(vectors)
    c = coefs.double().cpu()
    res, mag = [], []
    for i in range(n):
        row = c[i] if c.dim() == 2 else c
        r = target[i].double().cpu().clone()
        a = r.abs().clone()
        for j in range(k):
            cj = float(row[j])
            if cj != 0.0:
                v = vectors[j][i].double().cpu()
                r -= cj * v
                a += abs(cj) * v.abs()
        res.append(r)
        mag.append(a)
    return res, mag


def _assert_combine_close(target, ref, mag, k):
    # fp32 arithmetic (k fused terms + the subtraction, coefs rounded to fp32), one final rounding.
    for t, r, a in zip(target, ref, mag):
        got = t.double().cpu()
        tol = (2 * _eps(t.dtype) + (k + 4) * 2.0**-24) * a + 1e-38
        assert torch.all((got - r).abs() <= tol), f"{t.dtype} {tuple(t.shape)}: max err {(got - r).abs().max()}"


SHAPES = [(3, 5), (17,), (1000,), (257, 129), (0,), (1,), (70000,), (8, 0)]
DTYPE_SETS = {
    "fp32": [F32],
    "bf16": [BF16],
    "fp16": [F16],
    "mixed": [F32, BF16, F16],
}


def _lists(m, shapes, dtypes, kind, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for j in range(m):
        out.append([_make(s, dtypes[(i + j) % len(dtypes)], kind if (i + j) % 2 == 0 else "plain", gen, scale)
                    for i, s in enumerate(shapes)])
    return out


# ----------------------------------------------------------------------------- gram
@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 17, 33])
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS), ids=str)
@pytest.mark.parametrize("kind", ["plain", "misaligned", "noncontig"])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_gram_matches_oracle(m, dtypes, kind, per_tensor):
    vectors = _lists(m, SHAPES, DTYPE_SETS[dtypes], kind, seed=m * 7 + len(dtypes))
    out = _gram(vectors, per_tensor)
    _assert_gram_close(out, _ref_gram(vectors, per_tensor))


def test_gram_many_small_tensors():
    gen = torch.Generator().manual_seed(0)
    shapes = [((i * 37) % 301,) for i in range(131)] + [(100_003,)]  # > 110 tensors, zero sizes, a big one
    vectors = [[_make(s, [F32, BF16, F16][(i + j) % 3], "plain", gen) for i, s in enumerate(shapes)]
               for j in range(3)]
    for per_tensor in (False, True):
        _assert_gram_close(_gram(vectors, per_tensor), _ref_gram(vectors, per_tensor))


def test_gram_all_empty():
    vectors = [[torch.empty(0, device=DEV), torch.empty(3, 0, device=DEV, dtype=BF16)] for _ in range(2)]
    assert torch.equal(_gram(vectors, False), torch.zeros(2, 2, dtype=torch.float64, device=DEV))
    assert torch.equal(_gram(vectors, True), torch.zeros(2, 2, 2, dtype=torch.float64, device=DEV))


@pytest.mark.parametrize("m", [2, 12])
def test_gram_deterministic(m):
    vectors = _lists(m, [(300_001,), (5,), (4096, 17)], [F32, BF16], "plain", seed=3)
    a = _gram(vectors, False)
    b = _gram(vectors, False)
    torch.cuda.synchronize()
    assert torch.equal(a, b)
    # A second, distinct list with equal content (fresh table) gives the same bits too.
    clone = [[t.clone() for t in lst] for lst in vectors]
    assert torch.equal(_gram(clone, False), a)
    assert torch.equal(_gram(vectors, True), _gram(clone, True))


# ----------------------------------------------------------------------------- combine_
@pytest.mark.parametrize("k", [1, 2, 5, 33])
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS), ids=str)
@pytest.mark.parametrize("kind", ["plain", "misaligned", "noncontig"])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_combine_matches_oracle(k, dtypes, kind, per_tensor):
    dts = DTYPE_SETS[dtypes]
    lists = _lists(k + 1, SHAPES, dts, kind, seed=k * 11 + len(dts))
    target, vectors = lists[0], lists[1:]
    n = len(target)
    gen = torch.Generator().manual_seed(k)
    coefs = torch.randn((n, k) if per_tensor else (k,), generator=gen, dtype=torch.float64)
    ref, mag = _ref_combine(target, vectors, coefs)
    _combine(target, vectors, coefs.to(DEV))
    _assert_combine_close(target, ref, mag, len(vectors))


def test_combine_noncontig_target_writes_only_its_elements():
    base = torch.randn(64, 34, device=DEV)
    before = base.clone()
    t = base[:, ::2]  # non-contiguous target
    v = torch.randn(64, 17, device=DEV)
    _combine([t], [[v]], torch.tensor([0.5], dtype=torch.float64, device=DEV))
    assert torch.equal(base[:, 1::2], before[:, 1::2])
    torch.testing.assert_close(base[:, ::2], before[:, ::2] - 0.5 * v, rtol=1e-6, atol=1e-6)


def test_combine_zero_coef_skips_vector_and_tensor():
    gen = torch.Generator().manual_seed(5)
    t0 = _make((1000,), F32, gen=gen)
    t1 = _make((33,), BF16, gen=gen)
    t1[3] = float("nan")  # must survive bit-for-bit
    good = [_make((1000,), F32, gen=gen), _make((33,), BF16, gen=gen)]
    bad = [torch.full((1000,), float("inf"), device=DEV), torch.full((33,), float("nan"), device=DEV, dtype=F16)]
    t0_before, t1_before = t0.clone(), t1.clone()
    coefs = torch.tensor([[0.25, 0.0], [0.0, 0.0]], dtype=torch.float64, device=DEV)  # per tensor
    _combine([t0, t1], [good, bad], coefs)
    assert torch.isfinite(t0).all()
    torch.testing.assert_close(t0, t0_before - 0.25 * good[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(t1.view(torch.int16), t1_before.view(torch.int16))  # untouched, NaN included
    # Global coefficients with a zero: the inf reference is never read.
    _combine([t0], [[good[0]], [bad[0]]], torch.tensor([0.0, 0.0], dtype=torch.float64, device=DEV))
    assert torch.isfinite(t0).all()


def test_combine_many_tensors_and_big():
    gen = torch.Generator().manual_seed(9)
    shapes = [((i * 53) % 517,) for i in range(140)] + [(3, 70_001)]
    target = [_make(s, [F32, BF16, F16][i % 3], "plain", gen) for i, s in enumerate(shapes)]
    vectors = [[_make(s, [BF16, F32][(i + j) % 2], "misaligned" if i % 5 == 0 else "plain", gen)
                for i, s in enumerate(shapes)] for j in range(3)]
    coefs = torch.randn(len(shapes), 3, generator=gen, dtype=torch.float64)
    coefs[7] = 0.0
    ref, mag = _ref_combine(target, vectors, coefs)
    _combine(target, vectors, coefs.to(DEV))
    _assert_combine_close(target, ref, mag, len(vectors))


def test_combine_deterministic():
    gen = torch.Generator().manual_seed(2)
    t = [_make((300_000,), BF16, gen=gen), _make((77,), F32, gen=gen)]
    v = [[_make((300_000,), F32, gen=gen), _make((77,), F16, gen=gen)] for _ in range(4)]
    coefs = torch.randn(4, dtype=torch.float64).to(DEV)
    a = [x.clone() for x in t]
    b = [x.clone() for x in t]
    _combine(a, v, coefs)
    _combine(b, v, coefs)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- graphs and syncs
def _graph_case(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(513, 7), (64,), (0,), (100_000,), (5,)]
    target = [_make(s, [F32, BF16][i % 2], gen=gen) for i, s in enumerate(shapes)]
    vectors = [[_make(s, F32, gen=gen) for s in shapes] for _ in range(2)]
    return target, vectors


@pytest.mark.parametrize("warmup", [True, False], ids=["warm", "cold"])
def test_combine_cuda_graph_capture(warmup):
    target, vectors = _graph_case(seed=21 if warmup else 22)
    init = [t.clone() for t in target]
    coefs = torch.tensor([0.5, -0.25], dtype=torch.float64, device=DEV)
    if warmup:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            _combine(target, vectors, coefs)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        for t, i0 in zip(target, init):
            t.copy_(i0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        _combine(target, vectors, coefs)
    for new in ([0.5, -0.25], [1.0, 0.0], [-2.0, 3.0]):
        for t, i0 in zip(target, init):
            t.copy_(i0)
        coefs.copy_(torch.tensor(new, dtype=torch.float64))
        g.replay()
        torch.cuda.synchronize()
        c = torch.tensor(new, dtype=torch.float64)
        ref, mag = _ref_combine(init, vectors, c)
        _assert_combine_close(target, ref, mag, len(vectors))


def test_gram_cuda_graph_capture():
    _, vectors = _graph_case(seed=23)
    expected = _gram(vectors, True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = _gram(vectors, True)
    with torch.no_grad():
        vectors[0][3].mul_(2.0)
    g.replay()
    torch.cuda.synchronize()
    _assert_gram_close(out, _ref_gram(vectors, True))
    assert not torch.equal(out, expected)


@pytest.mark.parametrize("cold", [False, True], ids=["cached", "cold"])
def test_no_host_sync(cold):
    target, vectors = _graph_case(seed=31 if cold else 32)
    coefs = torch.tensor([[0.5, 0.0]] * len(target), dtype=torch.float64, device=DEV)
    if not cold:
        _combine(target, vectors, coefs)
        _gram(vectors, False)
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _combine(target, vectors, coefs)
        _gram(vectors, True)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
