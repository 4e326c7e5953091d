"""Kernel-level tests of the C++ CPU backend (atax::gram / atax::combine_) against a float64 oracle."""
from __future__ import annotations

import math

import pytest
import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def cpp():
    from atax_kernels import _ext
    from atax_kernels.ops import cpp as cpp_mod

    if not cpp_mod.available():
        pytest.skip(f"C++ extension could not be built: {_ext.build_info().get('error')}")
    return cpp_mod


# ----------------------------------------------------------------------------- oracle / helpers
def flat64(v):
    return torch.cat([t.double().flatten() for t in v]) if v else torch.zeros(0, dtype=torch.float64)


def gram_oracle(vectors, per_tensor):
    if per_tensor:
        n = len(vectors[0])
        out = []
        for i in range(n):
            R = torch.stack([v[i].double().flatten() for v in vectors])
            out.append(R @ R.T)
        return torch.stack(out)
    R = torch.stack([flat64(v) for v in vectors])
    return R @ R.T


def gram_tol(vectors, per_tensor, rel=1e-5):
    """|got - exact| <= rel * ||a|| * ||b|| per entry."""
    if per_tensor:
        norms = torch.stack([torch.stack([v[i].double().norm() for v in vectors]) for i in range(len(vectors[0]))])
        return rel * norms[:, :, None] * norms[:, None, :] + 1e-30
    norms = torch.stack([flat64(v).norm() for v in vectors])
    return rel * norms[:, None] * norms[None, :] + 1e-30


def check_gram(cpp, vectors, per_tensor, rel=1e-5):
    got = cpp.gram(vectors, per_tensor)
    exp = gram_oracle(vectors, per_tensor)
    assert got.dtype == torch.float64 and got.shape == exp.shape
    assert torch.equal(got, got.transpose(-1, -2)), "gram must be exactly symmetric"
    err = (got - exp).abs()
    tol = gram_tol(vectors, per_tensor, rel)
    assert bool((err <= tol).all()), f"max err/tol = {(err / tol).max().item()}"


def misaligned(shape, dtype, gen):
    n = math.prod(shape)
    buf = torch.randn(n + 1, generator=gen).to(dtype)
    t = buf[1 : 1 + n].view(shape)
    assert t.storage_offset() == 1
    return t


def transposed(shape, dtype, gen):
    if len(shape) < 2:
        return torch.randn(2 * shape[0], generator=gen).to(dtype)[::2] if shape[0] else torch.randn(0).to(dtype)
    base = torch.randn(*reversed(shape), generator=gen).to(dtype)
    t = base.transpose(0, -1) if len(shape) == 2 else base.permute(*reversed(range(len(shape))))
    assert tuple(t.shape) == tuple(shape)
    return t


SHAPES = [(7, 13), (1,), (0,), (3, 0, 5), (257,), (40, 33), (3, 5, 7)]


def make_list(shapes, dtypes, gen, kind="plain"):
    out = []
    for idx, (s, d) in enumerate(zip(shapes, dtypes)):
        k = kind if kind != "mixed" else ["plain", "misaligned", "transposed"][idx % 3]
        if k == "misaligned":
            out.append(misaligned(s, d, gen))
        elif k == "transposed":
            out.append(transposed(s, d, gen))
        else:
            out.append(torch.randn(s, generator=gen).to(d))
    return out


# ----------------------------------------------------------------------------- gram
@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("dtype", DTYPES + ["mixed"])
def test_gram_odd_shapes(cpp, m, per_tensor, dtype):
    gen = torch.Generator().manual_seed(1000 * m + int(per_tensor))
    vectors = []
    for j in range(m):
        if dtype == "mixed":
            dts = [DTYPES[(i + j) % 3] for i in range(len(SHAPES))]
        else:
            dts = [dtype] * len(SHAPES)
        vectors.append(make_list(SHAPES, dts, gen, kind="mixed"))
    # bf16/fp16 inputs: the oracle sees the same rounded values (tensor.double() is exact).
    check_gram(cpp, vectors, per_tensor)


@pytest.mark.parametrize("kind", ["plain", "misaligned", "transposed"])
def test_gram_layouts(cpp, kind):
    gen = torch.Generator().manual_seed(7)
    shapes = [(70000,), (300, 301), (5, 1000, 3)]
    vectors = [make_list(shapes, [torch.float32, torch.bfloat16, torch.float16], gen, kind) for _ in range(3)]
    check_gram(cpp, vectors, False)
    check_gram(cpp, vectors, True)


def test_gram_many_tensors(cpp):
    gen = torch.Generator().manual_seed(3)
    shapes = [(1 + (i * 37) % 500,) for i in range(130)]
    vectors = [make_list(shapes, [DTYPES[(i + j) % 3] for i in range(130)], gen) for j in range(2)]
    check_gram(cpp, vectors, False)
    check_gram(cpp, vectors, True)


def test_gram_all_empty(cpp):
    vectors = [[torch.zeros(0), torch.zeros(3, 0)] for _ in range(2)]
    assert torch.equal(cpp.gram(vectors, False), torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(cpp.gram(vectors, True), torch.zeros(2, 2, 2, dtype=torch.float64))


def test_gram_m33(cpp):
    gen = torch.Generator().manual_seed(33)
    vectors = [make_list([(1000,), (70001,)], [torch.float32, torch.bfloat16], gen) for _ in range(33)]
    check_gram(cpp, vectors, False)


def test_gram_near_orthogonal(cpp):
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(200000, generator=gen)
    b = torch.randn(200000, generator=gen)
    b = b - (a @ b) / (a @ a) * a
    check_gram(cpp, [[a], [b]], False)


# ----------------------------------------------------------------------------- combine_
def combine_oracle(target, vectors, coefs):
    out = []
    for i, t in enumerate(target):
        acc = t.double()
        for j, v in enumerate(vectors):
            c = coefs[j] if coefs.dim() == 1 else coefs[i, j]
            c = float(c)
            if c != 0.0:
                acc = acc - c * v[i].double()
        out.append(acc)
    return out


def check_combine(cpp, target, vectors, coefs, rel=None):
    orig = [t.clone() for t in target]
    exp = combine_oracle(orig, vectors, coefs)
    ptrs = [t.data_ptr() for t in target]
    cpp.combine_(target, vectors, coefs)
    assert [t.data_ptr() for t in target] == ptrs
    for i, (t, e, o) in enumerate(zip(target, exp, orig)):
        assert t.dtype == o.dtype and t.shape == o.shape
        eps = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[t.dtype]
        # fp32 arithmetic + one rounding to the target dtype.
        scale = o.double().abs() + sum(
            abs(float(coefs[j] if coefs.dim() == 1 else coefs[i, j])) * v[i].double().abs()
            for j, v in enumerate(vectors)
            if float(coefs[j] if coefs.dim() == 1 else coefs[i, j]) != 0.0
        )
        tol = (4 * len(vectors) + 4) * 2.0**-23 * scale + eps * e.abs() + 1e-30
        err = (t.double() - e).abs()
        assert bool((err <= tol).all()), f"tensor {i}: max err/tol {(err / tol).max().item()}"


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("per", [False, True])
@pytest.mark.parametrize("tdtype", DTYPES)
@pytest.mark.parametrize("vdtype", DTYPES + ["mixed"])
def test_combine(cpp, k, per, tdtype, vdtype):
    gen = torch.Generator().manual_seed(10 * k + int(per))
    n = len(SHAPES)
    target = make_list(SHAPES, [tdtype] * n, gen, kind="mixed")
    vectors = []
    for j in range(k):
        dts = [DTYPES[(i + j) % 3] for i in range(n)] if vdtype == "mixed" else [vdtype] * n
        vectors.append(make_list(SHAPES, dts, gen, kind=["plain", "mixed"][j % 2]))
    coefs = torch.randn((n, k) if per else (k,), generator=gen, dtype=torch.float64)
    check_combine(cpp, target, vectors, coefs)


@pytest.mark.parametrize("kind", ["plain", "misaligned", "transposed"])
def test_combine_layouts_large(cpp, kind):
    gen = torch.Generator().manual_seed(11)
    shapes = [(70000,), (300, 301), (5, 1000, 3)]
    target = make_list(shapes, [torch.float32, torch.bfloat16, torch.float16], gen, kind)
    vectors = [make_list(shapes, [torch.float32] * 3, gen, kind) for _ in range(2)]
    check_combine(cpp, target, vectors, torch.tensor([0.3, -1.7], dtype=torch.float64))
    check_combine(cpp, target, vectors, torch.randn(3, 2, dtype=torch.float64, generator=gen))


def test_combine_many_tensors(cpp):
    gen = torch.Generator().manual_seed(12)
    shapes = [(1 + (i * 53) % 700,) for i in range(130)]
    target = make_list(shapes, [DTYPES[i % 3] for i in range(130)], gen)
    vectors = [make_list(shapes, [DTYPES[(i + 1) % 3] for i in range(130)], gen) for _ in range(2)]
    check_combine(cpp, target, vectors, torch.randn(130, 2, dtype=torch.float64, generator=gen))


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_zero_coef_skips_inf(cpp, dtype):
    target = [torch.randn(1000).to(dtype), torch.randn(7, 13).to(dtype)]
    good = [torch.randn(1000).to(dtype), torch.randn(7, 13).to(dtype)]
    bad = [torch.full((1000,), float("inf")).to(dtype), torch.full((7, 13), float("nan")).to(dtype)]
    coefs = torch.tensor([0.5, 0.0], dtype=torch.float64)
    check_combine(cpp, target, [good, bad], coefs)
    assert all(bool(torch.isfinite(t).all()) for t in target)
    # per tensor: only tensor 0 zeroes the bad term; tensor 1 zeroes everything
    before = [t.clone() for t in target]
    coefs = torch.tensor([[0.25, 0.0], [0.0, 0.0]], dtype=torch.float64)
    cpp.combine_(target, [good, bad], coefs)
    assert bool(torch.isfinite(target[0]).all())
    assert torch.equal(target[1].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       before[1].view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("per", [False, True])
def test_combine_all_zero_is_bitwise_noop(cpp, per):
    # -0.0 and NaN payloads in the target must survive bit for bit.
    t = torch.randn(5000)
    t[0] = -0.0
    t[1] = float("nan")
    target = [t, torch.randn(33).to(torch.bfloat16), transposed((40, 70), torch.float16, torch.Generator())]
    before = [x.clone() for x in target]
    vectors = [[torch.full_like(x, float("inf")) for x in target] for _ in range(2)]
    coefs = torch.zeros((3, 2) if per else (2,), dtype=torch.float64)
    cpp.combine_(target, vectors, coefs)
    for a, b in zip(target, before):
        ib = torch.int32 if a.dtype == torch.float32 else torch.int16
        assert torch.equal(a.contiguous().view(ib), b.contiguous().view(ib))


# ----------------------------------------------------------------------------- determinism
def _big_lists(gen):
    shapes = [(768, 768), (3072,), (768, 1000), (999, 511), (100001,)]
    dts = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32]
    return [make_list(shapes, dts, gen, kind="mixed") for _ in range(3)]


def test_determinism_threads(cpp):
    gen = torch.Generator().manual_seed(99)
    vectors = _big_lists(gen)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        g1 = cpp.gram(vectors, False)
        p1 = cpp.gram(vectors, True)
        tgt1 = [t.clone() for t in vectors[0]]
        cpp.combine_(tgt1, vectors[1:], torch.tensor([0.7, -0.2], dtype=torch.float64))
        torch.set_num_threads(2)
        for _ in range(3):
            assert torch.equal(cpp.gram(vectors, False), g1)
            assert torch.equal(cpp.gram(vectors, True), p1)
            tgt2 = [t.clone() for t in vectors[0]]
            cpp.combine_(tgt2, vectors[1:], torch.tensor([0.7, -0.2], dtype=torch.float64))
            for a, b in zip(tgt1, tgt2):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- errors
def test_argument_errors(cpp):
    a = [torch.randn(4)]
    with pytest.raises(RuntimeError, match="multiple of m"):
        torch.ops.atax.gram([torch.randn(4)] * 3, 2, False)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.atax.gram([torch.randn(4), torch.randn(5)], 2, False)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.atax.gram([torch.randn(4, dtype=torch.float64)], 1, False)
    with pytest.raises(RuntimeError, match="float64"):
        cpp.combine_(a, [[torch.randn(4)]], torch.ones(1))
    with pytest.raises(RuntimeError, match="shape"):
        cpp.combine_(a, [[torch.randn(4)]], torch.ones(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="shape"):
        cpp.combine_(a, [[torch.randn(5)]], torch.ones(1, dtype=torch.float64))


# ----------------------------------------------------------------------------- opcheck
def _samples():
    gen = torch.Generator().manual_seed(0)
    yield [[torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]]
    yield [make_list([(7, 13), (0,), (257,)], [torch.float32, torch.bfloat16, torch.float16], gen, "mixed")
           for _ in range(2)]
    yield [make_list([(70000,), (3, 5)], [torch.bfloat16, torch.float32], gen) for _ in range(3)]


@pytest.mark.parametrize("idx", [0, 1, 2])
def test_opcheck(cpp, idx):
    vectors = list(_samples())[idx]
    m, n = len(vectors), len(vectors[0])
    flat = [t for v in vectors for t in v]
    for per in (False, True):
        torch.library.opcheck(torch.ops.atax.gram.default, (flat, m, per))
    target = [torch.randn(t.shape).to(t.dtype) for t in vectors[0]]
    torch.library.opcheck(torch.ops.atax.combine_.default, (target, flat, torch.randn(m, dtype=torch.float64)))
    torch.library.opcheck(torch.ops.atax.combine_.default, (target, flat, torch.randn(n, m, dtype=torch.float64)))
