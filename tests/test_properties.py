"""Property tests (hypothesis) of project_ on every backend, in float32."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import atax_kernels
import oracle
from conftest import backends_under_test

BACKENDS = backends_under_test()
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@st.composite
def problems(draw):
    n_tensors = draw(st.integers(1, 4))
    # The first tensor keeps the problem well above k dimensions, so random references are not
    # near-collinear (where the answer hinges on the rank cut-off, not on the kernels).
    shapes = [(draw(st.integers(16, 40)),)]
    shapes += [tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=2))) for _ in range(n_tensors - 1)]
    k = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    g_scale = 10.0 ** draw(st.integers(-10, 10))
    r_scales = [10.0 ** draw(st.integers(-10, 10)) for _ in range(k)]
    gen = torch.Generator().manual_seed(seed)
    refs = [[torch.randn(s, generator=gen) * sc for s in shapes] for sc in r_scales]
    grads = [torch.randn(s, generator=gen) * g_scale for s in shapes]
    # Mix references in so that conflicts (negative dots) are common.
    weights = (torch.rand(k, generator=gen) * 2 - 1).tolist()
    for i in range(n_tensors):
        for j in range(k):
            norm_ratio = g_scale / r_scales[j]
            grads[i] += weights[j] * norm_ratio * refs[j][i]
    mode = draw(st.sampled_from(["orthogonal", "conflict"]))
    granularity = draw(st.sampled_from(["global", "tensor"]))
    return grads, refs, mode, granularity


def _blocks(vectors_per_ref, granularity, n):
    """Pairs (g-part, R-part) per tensor (tensor granularity) or of the whole vector."""
    return list(range(n)) if granularity == "tensor" else [None]


def _dots(grads, refs, idx):
    sel = (lambda lst: [lst[idx]]) if idx is not None else (lambda lst: lst)
    g = oracle.flat64(sel(grads))
    R = torch.stack([oracle.flat64(sel(r)) for r in refs])
    return R @ g, g.norm() * R.norm(dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(problems())
def test_constraint_holds_after_projection(backend, problem):
    grads, refs, mode, granularity = problem
    before = [g.clone() for g in grads]
    norm_before = float(oracle.flat64(grads).norm())
    atax_kernels.project_(grads, refs, mode=mode, granularity=granularity, backend=backend)
    for idx in _blocks(refs, granularity, len(grads)):
        dots, _ = _dots(grads, refs, idx)
        _, scale = _dots(before, refs, idx)  # relative to |g| |r_j| before projection
        tol = 1e-4 * scale + 1e-30
        if mode == "orthogonal":
            # Dependent references get cut at the eigenvalue tolerance; random ones are independent.
            assert bool((dots.abs() <= tol).all()), f"R g' = {dots.tolist()} scale {scale.tolist()}"
        else:
            assert bool((dots >= -tol).all()), f"R g' = {dots.tolist()}"
    assert float(oracle.flat64(grads).norm()) <= norm_before * (1 + 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(problems())
def test_idempotent(backend, problem):
    grads, refs, mode, granularity = problem
    before = float(oracle.flat64(grads).norm())
    atax_kernels.project_(grads, refs, mode=mode, granularity=granularity, backend=backend)
    once = oracle.flat64(grads)
    atax_kernels.project_(grads, refs, mode=mode, granularity=granularity, backend=backend)
    twice = oracle.flat64(grads)
    assert float((once - twice).norm()) <= 1e-4 * before + 1e-30


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(problems(), st.integers(-6, 6))
def test_invariant_to_positive_reference_scaling(backend, problem, exponent):
    grads, refs, mode, granularity = problem
    scaled = [[t * (10.0 ** exponent) for t in r] for r in refs]
    other = [g.clone() for g in grads]
    before = float(oracle.flat64(grads).norm())
    atax_kernels.project_(grads, refs, mode=mode, granularity=granularity, backend=backend)
    atax_kernels.project_(other, scaled, mode=mode, granularity=granularity, backend=backend)
    a, b = oracle.flat64(grads), oracle.flat64(other)
    assert float((a - b).norm()) <= 1e-4 * before + 1e-30


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(problems())
def test_agrees_with_oracle(backend, problem):
    grads, refs, mode, granularity = problem
    expected = oracle.flat64(oracle.project(grads, refs, mode, 1.0, granularity))
    before = float(oracle.flat64(grads).norm())
    atax_kernels.project_(grads, refs, mode=mode, granularity=granularity, backend=backend)
    got = oracle.flat64(grads)
    assert float((got - expected).norm()) <= 1e-4 * before + 1e-30


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(problems())
def test_single_reference_matches_seed(backend, problem):
    grads, refs, _, _ = problem
    ref = refs[0]
    # The seed adds 1e-8 to |c|^2, which only matters for tiny references: compare where it cannot.
    if float(oracle.flat64(ref).norm()) ** 2 < 1e-2:
        ref = [t / float(oracle.flat64(ref).norm()) for t in ref]
    expected = oracle.seed_reference_project([g.double() for g in grads], [t.double() for t in ref])
    before = float(oracle.flat64(grads).norm())
    atax_kernels.project_(grads, ref, backend=backend)
    assert float((oracle.flat64(grads) - oracle.flat64(expected)).norm()) <= 1e-4 * before + 1e-30
