"""Every bad input gets a clear TypeError/ValueError naming what is wrong, and nothing is modified."""
from __future__ import annotations

import pytest
import torch

import atax_kernels


def _problem(n=3):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=gen) for _ in range(n)]
    refs = [torch.randn(4, 3, generator=gen) for _ in range(n)]
    return grads, refs


def _raises(exc, match, grads, *args, **kwargs):
    snapshot = [g.clone() for g in grads if isinstance(g, torch.Tensor) and g.device.type != "meta"]
    with pytest.raises(exc, match=match):
        atax_kernels.project_(grads, *args, **kwargs)
    after = [g for g in grads if isinstance(g, torch.Tensor) and g.device.type != "meta"]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after)), "a gradient was modified before the error"


def test_length_mismatch():
    grads, refs = _problem()
    _raises(ValueError, r"refs has 2 tensors but grads has 3", grads, refs[:2])
    _raises(ValueError, r"refs\[1\] has 2 tensors but grads has 3", grads, [refs, refs[:2]])


def test_shape_mismatch_names_index():
    grads, refs = _problem()
    refs[2] = torch.randn(3, 4)
    _raises(ValueError, r"refs\[2\] has shape \(3, 4\) but grads\[2\] has shape \(4, 3\)", grads, refs)


def test_device_mismatch():
    grads, refs = _problem()
    grads[1] = torch.randn(4, 3, device="meta")
    _raises(ValueError, r"grads\[1\] is on meta but grads\[0\] is on cpu", grads, refs)
    grads, refs = _problem()
    refs[0] = torch.randn(4, 3, device="meta")
    _raises(ValueError, r"refs\[0\] is on meta", grads, refs)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_bad_dtypes(dtype):
    grads, refs = _problem()
    refs[1] = torch.zeros(4, 3, dtype=dtype)
    _raises(TypeError, rf"refs\[1\] has dtype {dtype}", grads, refs)
    grads, refs = _problem()
    grads[0] = torch.zeros(4, 3, dtype=dtype)
    _raises(TypeError, r"grads\[0\] has dtype", grads, refs)


def test_sparse_tensor():
    grads, refs = _problem()
    refs[0] = torch.randn(4, 3).to_sparse()
    _raises(TypeError, r"refs\[0\] is a sparse", grads, refs)


def test_none_and_non_tensor_elements():
    grads, refs = _problem()
    grads_with_none = [grads[0], None, grads[2]]
    _raises(TypeError, r"grads\[1\] is None", grads_with_none, refs)
    _raises(TypeError, r"refs\[1\] is a float", grads, [refs[0], 1.0, refs[2]])
    with pytest.raises(TypeError, match=r"grads must be a tensor or a sequence"):
        atax_kernels.project_(3.0, refs)


def test_parameter_instead_of_gradient():
    grads, refs = _problem()
    grads[2] = torch.nn.Parameter(torch.randn(4, 3))
    _raises(ValueError, r"grads\[2\] requires grad", grads, refs)


def test_overlapping_grads_and_refs():
    buf = torch.randn(30)
    grads = [buf[0:12].view(4, 3), buf[10:22].view(4, 3)]
    refs = [torch.randn(4, 3), torch.randn(4, 3)]
    _raises(ValueError, r"grads\[0\] and grads\[1\] overlap", grads, refs)
    grads = [buf[0:12].view(4, 3), buf[12:24].view(4, 3)]
    _raises(ValueError, r"refs\[1\] overlaps grads\[0\]", grads, [refs[0], buf[0:12].view(4, 3)])
    _raises(ValueError, r"refs\[0\] overlaps grads\[1\]", grads, [grads[1], refs[1]])


def test_views_of_one_flat_buffer_are_fine():
    buf = torch.randn(24)
    grads = [buf[0:12].view(4, 3), buf[12:24].view(4, 3)]
    ref_buf = torch.randn(24)
    refs = [ref_buf[0:12].view(4, 3), ref_buf[12:24].view(4, 3)]
    stats = atax_kernels.project_(grads, refs)
    assert bool(stats.projected)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), float("inf")])
def test_strength_out_of_range(strength):
    grads, refs = _problem()
    _raises(ValueError, "strength must be in", grads, refs, strength=strength)


@pytest.mark.parametrize("strength", ["0.5", None, True])
def test_strength_wrong_type(strength):
    grads, refs = _problem()
    _raises(TypeError, "strength must be a real number", grads, refs, strength=strength)


def test_unknown_choices():
    grads, refs = _problem()
    _raises(ValueError, r"unknown mode 'pcgrad'.*'orthogonal', 'conflict'", grads, refs, mode="pcgrad")
    _raises(ValueError, r"unknown granularity 'layer'", grads, refs, granularity="layer")
    _raises(ValueError, r"unknown backend 'numpy'", grads, refs, backend="numpy")


def test_unavailable_backend_names_available_ones():
    grads, refs = _problem()
    if "cuda" in atax_kernels.available_backends():
        pytest.skip("cuda is available here")
    _raises(ValueError, r"backend 'cuda' is not available.*available: torch", grads, refs, backend="cuda")


def test_kernel_backend_rejects_float64():
    grads, refs = _problem()
    grads = [g.double() for g in grads]
    if "cpu" not in atax_kernels.available_backends():
        pytest.skip("cpu backend not built")
    _raises(TypeError, r"backend 'cpu' supports float32, bfloat16 and float16", grads, refs, backend="cpu")


def test_refs_empty_or_mixed():
    grads, refs = _problem()
    _raises(ValueError, "refs is empty", grads, [])
    _raises(TypeError, "mixes tensors and sequences", grads, [refs[0], refs])


def test_combine_bad_coefs():
    grads, refs = _problem()
    with pytest.raises(ValueError, match=r"coefs has shape \(2,\); expected \(1,\) or \(3, 1\)"):
        atax_kernels.combine_(grads, [refs], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="coefs must be a torch.Tensor"):
        atax_kernels.combine_(grads, [refs], [0.5])
    with pytest.raises(TypeError, match="coefs has dtype torch.int64"):
        atax_kernels.combine_(grads, [refs], torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="coefs is on meta"):
        atax_kernels.combine_(grads, [refs], torch.zeros(1, dtype=torch.float64, device="meta"))
    with pytest.raises(ValueError, match=r"vectors\[0\]\[1\] overlaps target\[1\]"):
        atax_kernels.combine_(grads, [[refs[0], grads[1], refs[2]]], torch.zeros(1, dtype=torch.float64))


def test_gram_lists_of_different_lengths():
    grads, refs = _problem()
    with pytest.raises(ValueError, match=r"vectors\[1\] has 2 tensors but vectors\[0\] has 3"):
        atax_kernels.gram([grads, refs[:2]])
    with pytest.raises(ValueError, match="vectors is empty"):
        atax_kernels.gram([])
    with pytest.raises(TypeError, match="vectors must be a sequence of tensor lists"):
        atax_kernels.gram(grads[0])
