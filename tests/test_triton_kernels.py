"""Triton backend (atax_triton::gram / combine_) against a float64 oracle. Runs on CPU under TRITON_INTERPRET=1."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

tb = importlib.import_module("atax_kernels.ops.triton")
if not tb.available(torch.device("cpu")):
    pytest.skip("triton backend unavailable on CPU (needs triton + TRITON_INTERPRET=1)", allow_module_level=True)
_table = importlib.import_module("atax_kernels.ops.triton._table")

DEV = torch.device("cpu")
SHAPES = [(7, 13), (1,), (0,), (3, 0, 5), (257,), (4100,)]  # 4100: crosses a chunk boundary
DTYPES = {
    "fp32": [torch.float32],
    "bf16": [torch.bfloat16],
    "fp16": [torch.float16],
    "mixed": [torch.float32, torch.bfloat16, torch.float16],
}


# ---------------------------------------------------------------- oracle (float64, flattening)
def _flat64(lst):
    return torch.cat([t.detach().double().flatten() for t in lst]) if lst else torch.zeros(0, dtype=torch.float64)


def oracle_gram(vectors, per_tensor):
    if per_tensor:
        n = len(vectors[0])
        return torch.stack([oracle_gram([[lst[i]] for lst in vectors], False) for i in range(n)])
    X = torch.stack([_flat64(lst) for lst in vectors])
    return X @ X.T


def oracle_combine(target, vectors, coefs):
    out = []
    for i, t in enumerate(target):
        acc = t.double().clone()
        for j in range(len(vectors)):
            c = coefs[j] if coefs.dim() == 1 else coefs[i, j]
            if c != 0:
                acc -= c.item() * vectors[j][i].double()
        out.append(acc)
    return out


def check_gram(got, vectors, per_tensor, tol=1e-5):
    exact = oracle_gram(vectors, per_tensor)
    assert got.dtype == torch.float64 and got.shape == exact.shape
    assert torch.equal(got, got.transpose(-1, -2)), "not exactly symmetric"
    if per_tensor:
        norms = torch.stack([torch.stack([lst[i].double().norm() for lst in vectors]) for i in range(len(vectors[0]))])
        scale = norms[:, :, None] * norms[:, None, :]
    else:
        nrm = torch.stack([_flat64(lst).norm() for lst in vectors])
        scale = nrm[:, None] * nrm[None, :]
    err = (got - exact).abs()
    assert bool((err <= tol * scale).all()), f"max err {err.max().item()} scale {scale.max().item()}"


def check_combine(got, exact, target_before, vectors, coefs):
    for i, (g, e) in enumerate(zip(got, exact)):
        tol = 1e-6 if g.dtype == torch.float32 else 1e-2
        cs = coefs if coefs.dim() == 1 else coefs[i]
        scale = target_before[i].double().norm() + sum(
            abs(cs[j].item()) * vectors[j][i].double().norm() for j in range(len(vectors)) if cs[j] != 0
        )
        err = (g.double() - e).abs()
        assert g.numel() == 0 or bool((err <= tol * scale + 1e-30).all()), f"tensor {i}: {err.max()} vs {scale}"


def make_list(shapes, dtypes, gen, scale=1.0):
    return [(torch.randn(s, generator=gen) * scale).to(dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)]


def call_gram(vectors, per_tensor):
    return tb.gram(vectors, per_tensor)


# ---------------------------------------------------------------- gram
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_gram_shapes_dtypes(m, per_tensor, dt):
    gen = torch.Generator().manual_seed(m * 10 + per_tensor)
    # rotate the dtype pattern per list so mixed lists differ list to list
    vectors = [make_list(SHAPES, DTYPES[dt][j % len(DTYPES[dt]):] + DTYPES[dt][: j % len(DTYPES[dt])], gen)
               for j in range(m)]
    if m > 1:
        vectors[1] = [v + 3.0 * w.to(v.dtype) for v, w in zip(vectors[1], vectors[0])]  # correlated
    got = call_gram(vectors, per_tensor)
    check_gram(got, vectors, per_tensor)


def test_gram_m33():
    gen = torch.Generator().manual_seed(33)
    vectors = [make_list([(5, 3), (40,)], [torch.float32, torch.bfloat16], gen) for _ in range(33)]
    for pt in (False, True):
        check_gram(call_gram(vectors, pt), vectors, pt)


def test_gram_many_tensors():
    gen = torch.Generator().manual_seed(1)
    shapes = [((i * 7) % 11,) for i in range(130)]  # includes zero-size
    vectors = [make_list(shapes, [torch.float32, torch.float16], gen) for _ in range(2)]
    for pt in (False, True):
        check_gram(call_gram(vectors, pt), vectors, pt)


def _odd_layouts(gen, dtype):
    buf = torch.randn(1 + 7 * 13 + 64, generator=gen).to(dtype)
    misaligned = buf[1:1 + 7 * 13].view(7, 13)  # storage offset 1: breaks 16-byte alignment
    transposed = torch.randn(9, 5, generator=gen).to(dtype).T
    strided = torch.randn(40, generator=gen).to(dtype)[::3]
    sliced = torch.randn(6, 8, generator=gen).to(dtype)[:, 2:5]
    return [misaligned, transposed, strided, sliced]


@pytest.mark.parametrize("per_tensor", [False, True])
def test_gram_noncontiguous_misaligned(per_tensor):
    gen = torch.Generator().manual_seed(2)
    vectors = [_odd_layouts(gen, torch.float32), _odd_layouts(gen, torch.bfloat16), _odd_layouts(gen, torch.float16)]
    check_gram(call_gram(vectors, per_tensor), vectors, per_tensor)


def _flat_views(gen, shapes, dtype, offset=0):
    total = sum(torch.Size(s).numel() for s in shapes)
    buf = torch.randn(offset + total, generator=gen).to(dtype)
    out, pos = [], offset
    for s in shapes:
        k = torch.Size(s).numel()
        out.append(buf[pos:pos + k].view(s))
        pos += k
    return out


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_gram_flat_buffer(per_tensor, offset):
    gen = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (0,), (5000,), (1,), (17,)]
    vectors = [_flat_views(gen, shapes, torch.float32, offset), _flat_views(gen, shapes, torch.bfloat16)]
    assert _table.is_flat(vectors)
    _table.clear_cache()
    check_gram(call_gram(vectors, per_tensor), vectors, per_tensor)
    assert [key[1] for key in _table._cache] == [not per_tensor]  # flat 1-D launch only for the global gram
    # same result as the table path on copies (deterministic chunking: identical bits)
    copies = [[t.clone() for t in lst] for lst in vectors]
    check_gram(call_gram(copies, per_tensor), copies, per_tensor)


def test_gram_all_empty():
    vectors = [[torch.zeros(0), torch.zeros(3, 0)] for _ in range(2)]
    assert torch.equal(call_gram(vectors, False), torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(call_gram(vectors, True), torch.zeros(2, 2, 2, dtype=torch.float64))


def test_gram_deterministic():
    gen = torch.Generator().manual_seed(4)
    vectors = [make_list([(9000,), (33,), (7, 13)], [torch.float32], gen) for _ in range(3)]
    for pt in (False, True):
        a = call_gram(vectors, pt)
        _table.clear_cache()
        b = call_gram(vectors, pt)
        assert torch.equal(a, b)


# ---------------------------------------------------------------- combine_
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("coef_kind", ["global", "per_tensor"])
@pytest.mark.parametrize("k", [1, 3])
def test_combine_shapes_dtypes(k, coef_kind, dt):
    gen = torch.Generator().manual_seed(k * 7 + len(dt))
    dts = DTYPES[dt]
    target = make_list(SHAPES, dts, gen)
    vectors = [make_list(SHAPES, dts[j % len(dts):] + dts[: j % len(dts)], gen) for j in range(k)]
    n = len(SHAPES)
    coefs = torch.randn(k if coef_kind == "global" else (n, k), generator=gen, dtype=torch.float64)
    before = [t.clone() for t in target]
    exact = oracle_combine(before, vectors, coefs)
    tb.combine_(target, vectors, coefs)
    check_combine(target, exact, before, vectors, coefs)


def test_combine_zero_coef_skips_inf_and_all_zero_unchanged():
    gen = torch.Generator().manual_seed(5)
    shapes = [(7, 13), (257,), (0,), (4100,)]
    n = len(shapes)
    target = make_list(shapes, [torch.float32, torch.bfloat16], gen)
    target[0][0, 0] = float("nan")  # all-zero tensor: NaN stays, bits unchanged
    target[0][1, 1] = -0.0
    good = make_list(shapes, [torch.float32], gen)
    bad = [torch.full(s, float("inf")) for s in shapes]
    bad[1][3] = float("nan")
    coefs = torch.tensor([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [-2.0, 0.0]], dtype=torch.float64)
    before = [t.clone() for t in target]
    tb.combine_(target, [good, bad], coefs)
    assert torch.equal(target[0].view(torch.int32), before[0].view(torch.int32))  # bitwise
    for i in (1, 3):
        assert torch.isfinite(target[i]).all()
    exact = oracle_combine(before, [good, bad], coefs)
    check_combine(target[1:], exact[1:], before[1:], [good[1:], bad[1:]], coefs[1:])
    # global coefs, all zero: every tensor bit-for-bit unchanged
    before = [t.clone() for t in target]
    tb.combine_(target, [bad], torch.zeros(1, dtype=torch.float64))
    for a, b in zip(target, before):
        assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           b.view(torch.int16 if b.element_size() == 2 else torch.int32))


def test_combine_noncontiguous_misaligned_target():
    gen = torch.Generator().manual_seed(6)
    target = _odd_layouts(gen, torch.float32) + _odd_layouts(gen, torch.bfloat16)
    vectors = [_odd_layouts(gen, torch.float16) + _odd_layouts(gen, torch.float32)]
    coefs = torch.tensor([0.75], dtype=torch.float64)
    before = [t.clone() for t in target]
    exact = oracle_combine(before, vectors, coefs)
    tb.combine_(target, vectors, coefs)
    check_combine(target, exact, before, vectors, coefs)


def test_combine_many_tensors_per_tensor_coefs():
    gen = torch.Generator().manual_seed(7)
    shapes = [((i * 5) % 9,) for i in range(120)]
    target = make_list(shapes, [torch.float32, torch.bfloat16], gen)
    vectors = [make_list(shapes, [torch.float16], gen) for _ in range(2)]
    coefs = torch.randn(len(shapes), 2, generator=gen, dtype=torch.float64)
    coefs[::4, 1] = 0.0
    before = [t.clone() for t in target]
    exact = oracle_combine(before, vectors, coefs)
    tb.combine_(target, vectors, coefs)
    check_combine(target, exact, before, vectors, coefs)


@pytest.mark.parametrize("coef_kind", ["global", "per_tensor"])
def test_combine_flat_buffer(coef_kind):
    gen = torch.Generator().manual_seed(8)
    shapes = [(3, 4), (0,), (5000,), (1,), (17,)]
    target = _flat_views(gen, shapes, torch.float32)
    vectors = [_flat_views(gen, shapes, torch.bfloat16, 1), _flat_views(gen, shapes, torch.float32)]
    assert _table.is_flat([target] + vectors)
    _table.clear_cache()
    coefs = torch.randn(2 if coef_kind == "global" else (len(shapes), 2), generator=gen, dtype=torch.float64)
    before = [t.clone() for t in target]
    exact = oracle_combine(before, vectors, coefs)
    tb.combine_(target, vectors, coefs)
    assert [key[1] for key in _table._cache] == [coef_kind == "global"]
    check_combine(target, exact, before, vectors, coefs)


def test_combine_deterministic_and_repeated():
    gen = torch.Generator().manual_seed(9)
    shapes = [(9000,), (33,), (7, 13)]
    target = make_list(shapes, [torch.bfloat16, torch.float32], gen)
    vectors = [make_list(shapes, [torch.float32], gen) for _ in range(3)]
    coefs = torch.randn(3, generator=gen, dtype=torch.float64)
    a = [t.clone() for t in target]
    b = [t.clone() for t in target]
    tb.combine_(a, vectors, coefs)
    _table.clear_cache()
    tb.combine_(b, vectors, coefs)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------- aligned (128-bit) path vs scalar path
def _misaligned_copy(t):
    """Same values at an address that is 2 bytes (bf16/fp16) or 4 bytes (fp32) past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("per_tensor", [False, True])
def test_gram_aligned_path_matches_scalar_path_bitwise(per_tensor):
    gen = torch.Generator().manual_seed(21)
    shapes = [(9000,), (1024,), (33,), (4096 + 1024 + 5,)]  # full blocks, exact block, tail only, mixed
    vectors = [make_list(shapes, [torch.float32, torch.bfloat16], gen), make_list(shapes, [torch.float16], gen)]
    _table.clear_cache()
    aligned = call_gram(vectors, per_tensor)
    assert all(tab.aligned for tab in _table._cache.values())
    check_gram(aligned, vectors, per_tensor)
    shifted = [[_misaligned_copy(t) for t in lst] for lst in vectors]
    _table.clear_cache()
    scalar = call_gram(shifted, per_tensor)
    assert not any(tab.aligned for tab in _table._cache.values())
    assert torch.equal(aligned, scalar)


def test_combine_aligned_path_matches_scalar_path_bitwise():
    gen = torch.Generator().manual_seed(22)
    shapes = [(9000,), (1024,), (33,), (4096 + 1024 + 5,)]
    target = make_list(shapes, [torch.bfloat16, torch.float32, torch.float16], gen)
    vectors = [make_list(shapes, [torch.float32], gen), make_list(shapes, [torch.bfloat16], gen)]
    coefs = torch.tensor([0.5, -1.25], dtype=torch.float64)
    before = [t.clone() for t in target]
    shifted_target = [_misaligned_copy(t) for t in target]
    shifted_vectors = [[_misaligned_copy(t) for t in lst] for lst in vectors]
    _table.clear_cache()
    tb.combine_(target, vectors, coefs)
    assert all(tab.aligned for tab in _table._cache.values())
    check_combine(target, oracle_combine(before, vectors, coefs), before, vectors, coefs)
    _table.clear_cache()
    tb.combine_(shifted_target, shifted_vectors, coefs)
    assert not any(tab.aligned for tab in _table._cache.values())
    for a, b in zip(target, shifted_target):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- ops / registration
def test_available():
    assert tb.available(torch.device("cpu"))
    assert tb.available("cpu")
    assert not tb.available(torch.device("meta"))


@pytest.mark.parametrize("per_tensor", [False, True])
def test_opcheck_gram(per_tensor):
    gen = torch.Generator().manual_seed(10)
    shapes = [(7, 3), (0,), (5,)]
    vectors = [make_list(shapes, [torch.float32], gen) for _ in range(2)]
    flat = [t for lst in vectors for t in lst]
    torch.library.opcheck(torch.ops.atax_triton.gram.default, (flat, 2, per_tensor))


@pytest.mark.parametrize("coef_kind", ["global", "per_tensor"])
def test_opcheck_combine(coef_kind):
    gen = torch.Generator().manual_seed(11)
    shapes = [(7, 3), (0,), (5,)]
    target = make_list(shapes, [torch.float32], gen)
    vectors = [make_list(shapes, [torch.float32], gen) for _ in range(2)]
    coefs = torch.randn(2 if coef_kind == "global" else (3, 2), generator=gen, dtype=torch.float64)
    flat = [t for lst in vectors for t in lst]
    torch.library.opcheck(torch.ops.atax_triton.combine_.default, (target, flat, coefs))


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        vs = [torch.empty(4), torch.empty(2, 3), torch.empty(4), torch.empty(2, 3)]
        assert torch.ops.atax_triton.gram(vs, 2, False).shape == (2, 2)
        out = torch.ops.atax_triton.gram(vs, 2, True)
        assert out.shape == (2, 2, 2) and out.dtype == torch.float64
        torch.ops.atax_triton.combine_(vs[:2], vs[2:], torch.empty(1, dtype=torch.float64))
