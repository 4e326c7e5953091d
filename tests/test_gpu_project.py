"""project_ on CUDA tensors with the GPU kernel backends: no host sync for one reference, graph capture,
and cuda/triton parity. Only runs on a CUDA machine (`make gpu-check`)."""
from __future__ import annotations

import pytest
import torch

import atax_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = ["cuda", "triton"]


def _problem(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(768, 768), (768,), (3072, 768), (5,), (0,), (1023,)]
    grads = [torch.randn(s, generator=gen).to(dtype).cuda() for s in shapes]
    ref = [torch.randn(s, generator=gen).to(dtype).cuda() for s in shapes]
    return grads, ref


def _need(backend):
    if backend not in atax_kernels.available_backends():
        pytest.skip(f"{backend} backend not available")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", ["orthogonal", "conflict"])
@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_one_reference_makes_no_host_sync(backend, mode, granularity):
    _need(backend)
    grads, ref = _problem()
    atax_kernels.project_(grads, ref, mode=mode, granularity=granularity, backend=backend)  # warm caches
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = atax_kernels.project_(grads, ref, mode=mode, granularity=granularity, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert not bool(stats.skipped)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_project_is_cuda_graph_capturable(backend):
    _need(backend)
    grads, ref = _problem(1)
    static = [g.clone() for g in grads]
    atax_kernels.project_(static, ref, backend=backend)  # warm-up outside capture
    torch.cuda.synchronize()
    for s, g in zip(static, grads):
        s.copy_(g)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        atax_kernels.project_(static, ref, backend=backend)
    for s, g in zip(static, grads):
        s.copy_(g)
    graph.replay()
    torch.cuda.synchronize()
    eager = [g.clone() for g in grads]
    atax_kernels.project_(eager, ref, backend=backend)
    for a, b in zip(static, eager):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_and_triton_agree(dtype):
    _need("cuda")
    _need("triton")
    grads, ref = _problem(2, dtype)
    other = [g.clone() for g in grads]
    atax_kernels.project_(grads, ref, backend="cuda")
    atax_kernels.project_(other, ref, backend="triton")
    num = sum(float((a.double() - b.double()).norm()) ** 2 for a, b in zip(grads, other)) ** 0.5
    den = sum(float(a.double().norm()) ** 2 for a in grads) ** 0.5
    assert num <= (1e-5 if dtype == torch.float32 else 1e-2) * den


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bitwise_deterministic(backend):
    _need(backend)
    grads, ref = _problem(3)
    runs = []
    for _ in range(3):
        g = [t.clone() for t in grads]
        atax_kernels.project_(g, [ref, [2 * t for t in ref]], backend=backend)
        runs.append(g)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
