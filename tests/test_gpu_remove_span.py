"""remove_span_ and the activation-space optimizer on CUDA tensors: every GPU backend against a float64 oracle,
and one projected step on a tiny model keeping observed inputs. Only runs on a CUDA machine (`make gpu-check`)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from atax_kernels import ActivationSubspace, ProjectedOptimizer
from atax_kernels.ops import remove_span_

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# "cuda" maps to the torch (cuBLAS) path; "triton" is the fused kernel (r <= 128) or cuBLAS above
GPU_BACKENDS = ["torch", "cuda", "triton"]


def _basis(d: int, r: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, max(r, 1), generator=gen, dtype=torch.float64))
    return q[:, :r]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [0, 16, 128, 300])
def test_matches_float64_oracle_on_cuda(backend, dtype, r):
    gen = torch.Generator().manual_seed(r)
    shapes = [(768, 256), (1000, 256), (33, 256)]
    bases64 = [_basis(256, r, gen) for _ in shapes]
    targets64 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    targets = [t.to(dtype).cuda() for t in targets64]
    targets[1] = targets[1].t().contiguous().t()  # a column-major view, as a Conv1D weight's .t() is
    inputs64 = [t.to(dtype).double() for t in targets64]
    stats = remove_span_(targets, [b.float().cuda() for b in bases64], backend=backend)
    torch.cuda.synchronize()
    for t, x, u, st in zip(targets, inputs64, bases64, stats.cpu()):
        want = x - (x @ u) @ u.T
        err = (t.double().cpu() - want).norm() / x.norm()
        assert err <= (1e-5 if dtype == torch.float32 else 1e-2), (backend, dtype, r, float(err))
        assert float(st[0]) == pytest.approx(float(x.norm() ** 2), rel=1e-4 if dtype == torch.float32 else 1e-2)
        assert float(st[1]) == pytest.approx(float((x @ u).norm() ** 2), rel=1e-3, abs=1e-6 * float(x.norm() ** 2))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_one_projected_step_keeps_observed_inputs_on_cuda(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48, bias=False), nn.GELU(), nn.Linear(48, 32, bias=False)).cuda()
    x_cap = torch.randn(8, 64, device="cuda")
    x_cap[:, 20:] = 0  # capability inputs: 8 directions inside the first 20 of 64
    sub = ActivationSubspace(model, energy=1.0)
    with torch.no_grad(), sub.observe():
        model(x_cap)
    sub.update()
    before = model(x_cap).detach()
    plain = copy.deepcopy(model)
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), activation_subspace=sub, backend=backend)
    popt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    x_safe = torch.randn(16, 64, device="cuda")
    for m, o in ((model, opt), (plain, popt)):
        o.zero_grad()
        m(x_safe).square().mean().backward()
        o.step()
    moved = (model(x_cap) - before).norm() / before.norm()
    moved_plain = (plain(x_cap) - before).norm() / before.norm()
    assert moved_plain > 1e-3
    assert moved <= 1e-4 * moved_plain, (float(moved), float(moved_plain))
