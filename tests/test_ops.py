"""gram and combine_ on every backend against the float64 oracle."""
from __future__ import annotations

import pytest
import torch

import atax_kernels
import oracle
from cases import DTYPE_CONFIGS, LAYOUTS, ODD_SHAPES, TOL, make_list, many_shapes
from conftest import backends_under_test

BACKENDS = backends_under_test()


def _lists(shapes, m, config, layout, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [make_list(shapes, config, j, layout, device, gen) for j in range(m)]


def assert_gram_close(got, vectors, per_tensor, tol):
    want = oracle.gram(vectors, per_tensor)
    got = got.cpu()
    assert got.dtype == torch.float64 and got.shape == want.shape
    if per_tensor:
        norms = torch.stack([torch.stack([oracle.flat64([v[i]]).norm() for v in vectors]) for i in range(len(vectors[0]))])
        scale = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    else:
        norms = torch.stack([oracle.flat64(v).norm() for v in vectors])
        scale = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    err = (got - want).abs()
    assert bool((err <= tol * scale + 1e-30).all()), f"max err/scale = {float((err / (scale + 1e-300)).max()):.3e}"
    assert torch.equal(got, got.transpose(-1, -2)), "Gram is not symmetric"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("config", DTYPE_CONFIGS)
def test_gram_dtypes(backend, m, per_tensor, config, device):
    vectors = _lists(ODD_SHAPES, m, config, "contiguous", device, seed=m)
    got = atax_kernels.gram(vectors, per_tensor=per_tensor, backend=backend)
    assert got.device.type == torch.device(device).type
    assert_gram_close(got, vectors, per_tensor, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shapes_name", ["odd", "many"])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_gram_layouts(backend, layout, shapes_name, per_tensor, device):
    shapes = ODD_SHAPES if shapes_name == "odd" else many_shapes(115)
    vectors = _lists(shapes, 3, "fp32", layout, device, seed=1)
    got = atax_kernels.gram(vectors, per_tensor=per_tensor, backend=backend)
    assert_gram_close(got, vectors, per_tensor, 1e-5)


def _combine_expected(target, vectors, coefs):
    c = coefs.cpu()
    out = []
    for i, t in enumerate(target):
        row = c[i] if c.dim() == 2 else c
        acc = t.detach().cpu().double()
        for j, v in enumerate(vectors):
            acc = acc - row[j] * v[i].detach().cpu().double()
        out.append(acc)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("config", DTYPE_CONFIGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_combine(backend, k, per_tensor, config, layout, device):
    shapes = ODD_SHAPES
    lists = _lists(shapes, k + 1, config, layout, device, seed=k)
    target, vectors = lists[0], lists[1:]
    gen = torch.Generator().manual_seed(k)
    coefs = torch.randn((len(shapes), k) if per_tensor else (k,), generator=gen, dtype=torch.float64).to(device)
    expected = _combine_expected(target, vectors, coefs)
    atax_kernels.combine_(target, vectors, coefs, backend=backend)
    for i, (t, e) in enumerate(zip(target, expected)):
        row = coefs.cpu()[i] if per_tensor else coefs.cpu()
        scale = float(oracle.flat64([t]).norm()) + sum(abs(float(row[j])) * float(oracle.flat64([vectors[j][i]]).norm()) for j in range(k))
        err = float((t.detach().cpu().double() - e).norm())
        assert err <= TOL[t.dtype] * scale + 1e-30, f"tensor {i} ({t.dtype}): err {err:.3e} scale {scale:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_skips_zero_coefficient_terms(backend, device):
    lists = _lists([(5, 3), (7,)], 3, "fp32", "contiguous", device, seed=3)
    target, vectors = lists[0], lists[1:]
    vectors[1][0][1, 1] = float("inf")
    vectors[1][1][2] = float("nan")
    coefs = torch.tensor([0.5, 0.0], dtype=torch.float64, device=device)
    expected = _combine_expected(target, [vectors[0]], coefs[:1])
    atax_kernels.combine_(target, vectors, coefs, backend=backend)
    for t, e in zip(target, expected):
        assert torch.isfinite(t).all()
        assert torch.allclose(t.cpu().double(), e, atol=1e-6)
    before = [t.clone() for t in target]
    atax_kernels.combine_(target, vectors, torch.zeros(2, dtype=torch.float64, device=device), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(before, target))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_deterministic(backend, device):
    vectors = _lists(many_shapes(120) + [(4099,), (300, 7)], 3, "mixed", "contiguous", device, seed=9)
    first = atax_kernels.gram(vectors, backend=backend)
    per = atax_kernels.gram(vectors, per_tensor=True, backend=backend)
    for _ in range(2):
        assert torch.equal(first, atax_kernels.gram(vectors, backend=backend))
        assert torch.equal(per, atax_kernels.gram(vectors, per_tensor=True, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_lists(backend, device):
    assert atax_kernels.gram([[], []], backend=backend).shape == (2, 2)
    assert atax_kernels.gram([[], []], per_tensor=True, backend=backend).shape == (0, 2, 2)
    atax_kernels.combine_([], [[]], torch.zeros(1, dtype=torch.float64), backend=backend)


def test_available_backends_lists_torch():
    names = atax_kernels.available_backends()
    assert names[0] == "torch" and len(set(names)) == len(names)
    assert set(names) <= {"torch", "cpu", "cuda", "triton"}


def test_default_backend_for_cpu_prefers_cpp_kernel():
    from atax_kernels.ops.registry import resolve

    chosen = resolve(None, torch.device("cpu"), {torch.float32}).name
    assert chosen == ("cpu" if "cpu" in atax_kernels.available_backends() else "torch")
    assert resolve(None, torch.device("cpu"), {torch.float64}).name == "torch"


def test_env_override(monkeypatch):
    from atax_kernels.ops.registry import resolve

    monkeypatch.setenv("ATAX_BACKEND", "torch")
    assert resolve(None, torch.device("cpu"), {torch.float32}).name == "torch"
    monkeypatch.setenv("ATAX_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="ATAX_BACKEND"):
        resolve(None, torch.device("cpu"), {torch.float32})
    assert resolve("torch", torch.device("cpu"), {torch.float32}).name == "torch"
