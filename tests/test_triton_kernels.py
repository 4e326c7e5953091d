"""Triton backend (atax_triton::gram / combine_) against a float64 oracle. Runs on CPU under TRITON_INTERPRET=1,
or, with ATAX_TEST_DEVICE=cuda (make gpu-check), on CUDA tensors with the compiled kernels."""
import os

DEVICE = os.environ.get("ATAX_TEST_DEVICE", "cpu")
if DEVICE == "cpu":  # only then: compiled (GPU) kernels must never be handed CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

DEV = torch.device(DEVICE)
tb = importlib.import_module("atax_kernels.ops.triton")
if not tb.available(DEV):
    pytest.skip(f"triton backend unavailable on {DEV} (CPU needs triton + TRITON_INTERPRET=1 at import)",
                allow_module_level=True)
_table = importlib.import_module("atax_kernels.ops.triton._table")
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
    return [(torch.randn(s, generator=gen) * scale).to(device=DEV, dtype=dtypes[i % len(dtypes)])
            for i, s in enumerate(shapes)]


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
    buf = torch.randn(1 + 7 * 13 + 64, generator=gen).to(DEV, dtype)
    misaligned = buf[1:1 + 7 * 13].view(7, 13)  # storage offset 1: breaks 16-byte alignment
    transposed = torch.randn(9, 5, generator=gen).to(DEV, dtype).T
    strided = torch.randn(40, generator=gen).to(DEV, dtype)[::3]
    sliced = torch.randn(6, 8, generator=gen).to(DEV, dtype)[:, 2:5]
    return [misaligned, transposed, strided, sliced]


@pytest.mark.parametrize("per_tensor", [False, True])
def test_gram_noncontiguous_misaligned(per_tensor):
    gen = torch.Generator().manual_seed(2)
    vectors = [_odd_layouts(gen, torch.float32), _odd_layouts(gen, torch.bfloat16), _odd_layouts(gen, torch.float16)]
    check_gram(call_gram(vectors, per_tensor), vectors, per_tensor)


def _flat_views(gen, shapes, dtype, offset=0):
    total = sum(torch.Size(s).numel() for s in shapes)
    buf = torch.randn(offset + total, generator=gen).to(DEV, dtype)
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
    vectors = [[torch.zeros(0, device=DEV), torch.zeros(3, 0, device=DEV)] for _ in range(2)]
    assert torch.equal(call_gram(vectors, False), torch.zeros(2, 2, dtype=torch.float64, device=DEV))
    assert torch.equal(call_gram(vectors, True), torch.zeros(2, 2, 2, dtype=torch.float64, device=DEV))


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
    coefs = torch.randn(k if coef_kind == "global" else (n, k), generator=gen, dtype=torch.float64).to(DEV)
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
    bad = [torch.full(s, float("inf"), device=DEV) for s in shapes]
    bad[1][3] = float("nan")
    coefs = torch.tensor([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [-2.0, 0.0]], dtype=torch.float64, device=DEV)
    before = [t.clone() for t in target]
    tb.combine_(target, [good, bad], coefs)
    assert torch.equal(target[0].view(torch.int32), before[0].view(torch.int32))  # bitwise
    for i in (1, 3):
        assert torch.isfinite(target[i]).all()
    exact = oracle_combine(before, [good, bad], coefs)
    check_combine(target[1:], exact[1:], before[1:], [good[1:], bad[1:]], coefs[1:])
    # global coefs, all zero: every tensor bit-for-bit unchanged
    before = [t.clone() for t in target]
    tb.combine_(target, [bad], torch.zeros(1, dtype=torch.float64, device=DEV))
    for a, b in zip(target, before):
        assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           b.view(torch.int16 if b.element_size() == 2 else torch.int32))


def test_combine_noncontiguous_misaligned_target():
    gen = torch.Generator().manual_seed(6)
    target = _odd_layouts(gen, torch.float32) + _odd_layouts(gen, torch.bfloat16)
    vectors = [_odd_layouts(gen, torch.float16) + _odd_layouts(gen, torch.float32)]
    coefs = torch.tensor([0.75], dtype=torch.float64, device=DEV)
    before = [t.clone() for t in target]
    exact = oracle_combine(before, vectors, coefs)
    tb.combine_(target, vectors, coefs)
    check_combine(target, exact, before, vectors, coefs)


def test_combine_many_tensors_per_tensor_coefs():
    gen = torch.Generator().manual_seed(7)
    shapes = [((i * 5) % 9,) for i in range(120)]
    target = make_list(shapes, [torch.float32, torch.bfloat16], gen)
    vectors = [make_list(shapes, [torch.float16], gen) for _ in range(2)]
    coefs = torch.randn(len(shapes), 2, generator=gen, dtype=torch.float64).to(DEV)
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
    coefs = torch.randn(2 if coef_kind == "global" else (len(shapes), 2), generator=gen, dtype=torch.float64).to(DEV)
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
    coefs = torch.randn(3, generator=gen, dtype=torch.float64).to(DEV)
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
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
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
    coefs = torch.tensor([0.5, -1.25], dtype=torch.float64, device=DEV)
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
    assert tb.available(DEV)
    assert tb.available(str(DEV))
    assert not tb.available(torch.device("meta"))
    # interpreted kernels never claim the GPU, compiled ones never claim the CPU
    assert tb.available("cpu") == tb.INTERPRET and (not tb.INTERPRET or not tb.available("cuda"))


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
    coefs = torch.randn(2 if coef_kind == "global" else (3, 2), generator=gen, dtype=torch.float64).to(DEV)
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


# ---------------------------------------------------------------- tables (O(n), vectorised), alignment per tensor
def _naive_layout(numels, chunk, span):
    """Per-chunk rows and spans by a plain loop: the oracle of the vectorised table build."""
    first, rows = [0], []
    for i, ne in enumerate(numels):
        rows += [(i, s, min(chunk, ne - s)) for s in range(0, ne, chunk)]
        first.append(len(rows))
    spans, segs = [], []
    for i in range(len(numels)):
        s0 = len(spans)
        spans += [(c, min(c + span, first[i + 1])) for c in range(first[i], first[i + 1], span)]
        segs.append((s0, len(spans)))
    gspans = [(c, min(c + span, len(rows))) for c in range(0, len(rows), span)]
    return first, rows, spans, segs, gspans


def test_chunk_layout_matches_naive_loop():
    numels = [0, 5000, 4096, 1, 0, 4096 * 7 + 3, 2, 4096 * 3]
    first, spans, segs, gspans = (x.tolist() for x in _table.chunk_layout(numels))
    f0, rows, s0, g0, gs0 = _naive_layout(numels, _table.CHUNK, _table.SPAN)
    assert first == f0 and spans == [list(x) for x in s0] and segs == [list(x) for x in g0]
    assert gspans == [list(x) for x in gs0]


def test_chunk_layout_small_span_and_fake_addresses(monkeypatch):
    # sizes and addresses only, nothing allocated: what the 70B table bench builds
    monkeypatch.setattr(_table, "SPAN", 3)
    numels = [4096 * 7 + 3, 0, 10, 4096 * 4]
    first, spans, segs, gspans = (x.tolist() for x in _table.chunk_layout(numels))
    f0, rows, s0, g0, gs0 = _naive_layout(numels, _table.CHUNK, 3)
    assert (first, spans, segs, gspans) == (f0, [list(x) for x in s0], [list(x) for x in g0],
                                            [list(x) for x in gs0])
    base = _table.anchor(torch.device("cpu")).data_ptr()
    ptrs = [base + 16 * 100, base + 16 * 200 + 2, base + 16 * 300, base + 16 * 400,  # list 0
            base + 16 * 500, base + 16 * 600, base + 16 * 700 + 4, base + 16 * 800]  # list 1
    tab = _table._build(torch.device("cpu"), False, ptrs, [0, 2, 0, 1] * 2, numels)
    assert tab.al.tolist() == [1, 0, 0, 1]  # tensor 1 misaligned in list 0, tensor 2 in list 1
    assert tab.any_aligned and not tab.aligned and tab.n_chunks == f0[-1]
    assert tab.qs.tolist() == [100, 0, 0, 400, 500, 0, 0, 800]
    assert tab.ptrs.tolist() == ptrs and tab.numels.tolist() == numels
    assert 2 ** (tab.search_steps - 1) >= len(numels)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_two_level_reduction_across_many_spans(per_tensor, monkeypatch):
    monkeypatch.setattr(_table, "SPAN", 2)  # level 1 sums pairs of chunks: several spans per tensor
    _table.clear_cache()
    gen = torch.Generator().manual_seed(31)
    shapes = [(4096 * 5 + 7,), (3,), (0,), (4096 * 2,)]
    vectors = [make_list(shapes, [torch.float32, torch.bfloat16], gen) for _ in range(2)]
    a = call_gram(vectors, per_tensor)
    check_gram(a, vectors, per_tensor)
    _table.clear_cache()
    assert torch.equal(a, call_gram(vectors, per_tensor))
    _table.clear_cache()


@pytest.mark.parametrize("per_tensor", [False, True])
def test_alignment_is_decided_per_tensor_with_identical_bits(per_tensor):
    gen = torch.Generator().manual_seed(32)
    shapes = [(9000,), (1024,), (4096 + 5,)]
    vectors = [make_list(shapes, [torch.float32], gen), make_list(shapes, [torch.bfloat16], gen)]
    _table.clear_cache()
    ref = call_gram(vectors, per_tensor)
    mixed = [list(lst) for lst in vectors]
    mixed[1][1] = _misaligned_copy(mixed[1][1])  # only tensor 1 of list 1 is misaligned
    _table.clear_cache()
    got = call_gram(mixed, per_tensor)
    (tab,) = _table._cache.values()
    assert tab.al.tolist() == [1, 0, 1] and tab.any_aligned
    assert torch.equal(ref, got)  # same element order on both paths: bits depend on shapes only
    target = make_list(shapes, [torch.float32], gen)
    target2 = [t.clone() for t in target]
    target2[2] = _misaligned_copy(target2[2])
    coefs = torch.tensor([0.5, -0.25], dtype=torch.float64, device=DEV)
    tb.combine_(target, vectors, coefs)
    tb.combine_(target2, vectors, coefs)
    assert all(torch.equal(x, y) for x, y in zip(target, target2))


def test_dense_noncontiguous_lists_are_not_copied():
    gen = torch.Generator().manual_seed(33)
    base = [torch.randn(7, 9, generator=gen).to(DEV) for _ in range(3)]
    lists = [[b.T] for b in base]  # transposed, same strides in every list: processed in memory order
    out = _table.storage_order(lists)
    assert all(o[0].data_ptr() == b.data_ptr() and o[0].is_contiguous() for o, b in zip(out, base))
    mixed = _table.storage_order([[base[0].T], [base[1].T.contiguous()]])  # strides differ: copies
    assert mixed[0][0].data_ptr() != base[0].data_ptr()
    target = base[0].T
    before = target.clone()
    vec = [[base[1].T], [base[2].T]]
    coefs = torch.tensor([0.5, 2.0], dtype=torch.float64, device=DEV)
    tb.combine_([target], vec, coefs)
    check_combine([target], oracle_combine([before], vec, coefs), [before], vec, coefs)
    check_gram(call_gram([[base[0].T], [base[1].T]], False), [[base[0].T], [base[1].T]], False)


def test_table_built_during_graph_capture_is_not_cached(monkeypatch):
    monkeypatch.setattr(_table, "_capturing", lambda device: True)
    _table.clear_cache()
    gen = torch.Generator().manual_seed(34)
    vectors = [make_list([(5000,), (3,)], [torch.float32], gen) for _ in range(2)]
    n_captured = len(_table._captured)
    check_gram(call_gram(vectors, False), vectors, False)
    assert len(_table._cache) == 0 and len(_table._captured) == n_captured + 1  # kept alive, not shared
    _table._captured.pop()
    monkeypatch.setattr(_table, "_capturing", lambda device: False)
    call_gram(vectors, False)
    assert len(_table._cache) == 1


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_tensors_device():
    gen = torch.Generator().manual_seed(35)
    dev1 = torch.device("cuda", 1)
    vectors = [[(torch.randn(9000, generator=gen)).to(dev1)] for _ in range(2)]
    with torch.cuda.device(0):
        got = call_gram(vectors, False)
        target = [torch.randn(9000, generator=gen).to(dev1)]
        before = [target[0].clone()]
        coefs = torch.tensor([0.5], dtype=torch.float64, device=dev1)
        tb.combine_(target, [vectors[0]], coefs)
    assert got.device == dev1
    check_gram(got, vectors, False)
    check_combine(target, oracle_combine(before, [vectors[0]], coefs), before, [vectors[0]], coefs)
