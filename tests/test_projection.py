"""project_ on every backend against the float64 oracle, across modes, k, granularity, dtypes, layouts."""
from __future__ import annotations

import pytest
import torch

import atax_kernels
import oracle
from cases import DTYPE_CONFIGS, LAYOUTS, ODD_SHAPES, many_shapes, make_problem, output_tol
from conftest import backends_under_test

BACKENDS = backends_under_test()


def assert_close_to_oracle(grads, expected, tol, label=""):
    got = oracle.flat64(grads)
    want = torch.cat([e.reshape(-1) for e in expected]) if expected else torch.zeros(0, dtype=torch.float64)
    scale = max(float(want.norm()), 1e-300)
    err = float((got - want).norm())
    assert err <= tol * scale, f"{label}: |got - oracle| = {err:.3e} > {tol:.1e} * |oracle| = {tol * scale:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["orthogonal", "conflict"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("granularity", ["global", "tensor"])
@pytest.mark.parametrize("config", DTYPE_CONFIGS)
def test_modes_against_oracle(backend, mode, k, granularity, config, device):
    grads, refs = make_problem(ODD_SHAPES, k, config, device=device, seed=k * 7 + len(config))
    expected = oracle.project(grads, refs, mode, 1.0, granularity)
    stats = atax_kernels.project_(grads, refs, mode=mode, granularity=granularity, backend=backend)
    assert not bool(stats.skipped)
    assert_close_to_oracle(grads, expected, output_tol(grads) + output_tol(refs[0]), f"{backend}/{mode}/k={k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shapes_name", ["odd", "many"])
@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_layouts_against_oracle(backend, layout, shapes_name, granularity, device):
    shapes = ODD_SHAPES if shapes_name == "odd" else many_shapes(115)
    grads, refs = make_problem(shapes, 2, "fp32", layout, device=device, seed=3)
    expected = oracle.project(grads, refs, "orthogonal", 0.7, granularity)
    atax_kernels.project_(grads, refs, strength=0.7, granularity=granularity, backend=backend)
    assert_close_to_oracle(grads, expected, 2e-5, f"{backend}/{layout}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["orthogonal", "conflict"])
def test_strength_scales_removed_part(backend, mode, device):
    grads, refs = make_problem(ODD_SHAPES, 2, device=device, seed=11)
    before = oracle.flat64(grads)
    full = oracle.flat64(oracle.project(grads, refs, mode, 1.0))
    atax_kernels.project_(grads, refs, mode=mode, strength=0.25, backend=backend)
    want = before + 0.25 * (full - before)
    assert float((oracle.flat64(grads) - want).norm()) <= 2e-5 * float(before.norm())


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_fields(backend, device):
    grads, refs = make_problem([(50,), (3, 4)], 2, device=device, seed=5)
    g, R = oracle.flat64(grads), torch.stack([oracle.flat64(r) for r in refs])
    stats = atax_kernels.project_(grads, refs, backend=backend)
    dots = R @ g
    assert torch.allclose(stats.dots.cpu(), dots, rtol=1e-5, atol=1e-6 * float(g.norm() * R.norm()))
    cos = dots / (g.norm() * R.norm(dim=1))
    assert torch.allclose(stats.cosines.cpu(), cos, atol=1e-5)
    removed = float((oracle.flat64(grads) - g).norm() / g.norm())
    assert abs(float(stats.removed_fraction) - removed) <= 1e-5
    assert bool(stats.projected) and not bool(stats.skipped) and stats.reason is None
    assert stats.coefs.shape == (2,)
    d = stats.as_dict()
    assert d["skipped"] is False and len(d["dots"]) == 2
    per = atax_kernels.project_(grads, refs, granularity="tensor", backend=backend)
    assert per.coefs.shape == (2, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_seed_reference_for_one_reference(backend, device):
    grads, refs = make_problem(ODD_SHAPES, 1, device=device, seed=2)
    expected = oracle.seed_reference_project([g.cpu() for g in grads], [r.cpu() for r in refs[0]])
    atax_kernels.project_(grads, refs[0], backend=backend)
    assert_close_to_oracle(grads, [e.double() for e in expected], 2e-5, "seed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_deficient_and_zero_references(backend, device):
    grads, refs = make_problem([(40,), (6, 5)], 2, device=device, seed=8)
    dependent = [2 * t for t in refs[0]]
    zero = [torch.zeros_like(t) for t in refs[0]]
    all_refs = [refs[0], refs[1], dependent, zero]
    expected = oracle.project(grads, all_refs)
    stats = atax_kernels.project_(grads, all_refs, backend=backend)
    assert torch.isfinite(stats.coefs).all()
    assert_close_to_oracle(grads, expected, 1e-4, "rank-deficient")
    before = [g.clone() for g in grads]
    stats = atax_kernels.project_(grads, zero, backend=backend)
    assert not bool(stats.projected)
    assert all(torch.equal(a, b) for a, b in zip(before, grads))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["grad", "ref"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("k", [1, 3])
def test_nonfinite_leaves_gradients_untouched(backend, where, value, k, device):
    grads, refs = make_problem([(9,), (4, 4)], k, device=device, seed=4)
    (grads if where == "grad" else refs[k - 1])[1][2, 3] = value
    before = [g.clone() for g in grads]
    stats = atax_kernels.project_(grads, refs, backend=backend)
    assert bool(stats.skipped) and not bool(stats.projected)
    for a, b in zip(before, grads):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), "gradient bits changed"
    expected = "the gradient" if where == "grad" else f"reference {k - 1}"
    assert expected in stats.reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_grads_is_noop(backend):
    stats = atax_kernels.project_([], [], backend=backend) if False else atax_kernels.project_([], [[]], backend=backend)
    assert not bool(stats.projected) and not bool(stats.skipped)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_tensor_arguments(backend, device):
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(17, 3, generator=gen).to(device)
    r = torch.randn(17, 3, generator=gen).to(device)
    expected = oracle.project([g], [[r]])
    atax_kernels.project_(g, r, backend=backend)
    assert_close_to_oracle([g], expected, 2e-5, "single tensor")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("k", [1, 2])
def test_usable_inside_torch_compile_fullgraph(backend, k, device):
    torch._dynamo.reset()
    grads, refs = make_problem([(6, 5), (7,)], k, device=device, seed=12)
    eager = [g.clone() for g in grads]
    eager_stats = atax_kernels.project_(eager, refs, backend=backend)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(gs, rs):
        stats = atax_kernels.project_(gs, rs, backend=backend)
        return stats.removed_fraction * 2

    out = step(grads, refs)
    assert torch.allclose(out.cpu(), 2 * eager_stats.removed_fraction.cpu())
    for a, b in zip(grads, eager):
        assert torch.equal(a, b)
