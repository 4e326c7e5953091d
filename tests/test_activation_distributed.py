"""ActivationSubspace across 2 gloo processes: moments summed in update(), so every replica gets the same basis
(bit for bit) as one process that saw all the data; a DDP step then leaves bit-identical replicas; FSDP2
row-sharded Linear weights project their local shards with the replicated basis."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from atax_kernels import ActivationSubspace, ProjectedOptimizer
from test_distributed import _init, _spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is required")

WORLD = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8, bias=False), nn.Identity(), nn.Linear(8, 4)).double()


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    # rank-3 inputs: every weight keeps free directions
    return torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 6, generator=g, dtype=torch.float64)


def _safety(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(10, 6, generator=g, dtype=torch.float64)


def _same_on_all_ranks(t: torch.Tensor, what: str) -> None:
    t = t.detach().contiguous()
    got = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(got, t)
    assert all(torch.equal(x, got[0]) for x in got), f"{what} differs across ranks"


def _projectors(sub):
    return [g.basis.double() @ g.basis.double().t() for g in sub._groups]


def _ddp_worker(rank, world, port):
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, world, port)
    try:
        data = _data()
        half = data[rank * 20:(rank + 1) * 20]
        model = _model()
        oracle_model = copy.deepcopy(model)
        ddp = DDP(model)
        sub = ActivationSubspace(model, energy=1.0, basis_dtype=torch.float64)
        with torch.no_grad(), sub.observe():
            ddp(half)
        sub.update()
        for g in sub._groups:
            _same_on_all_ranks(g.basis, f"basis of {g.members}")
        # One process that saw everything (no communication): the same span.
        oracle = ActivationSubspace(oracle_model, energy=1.0, basis_dtype=torch.float64)
        oracle._all_reduce = lambda: None
        with torch.no_grad(), oracle.observe():
            oracle_model(data)
        oracle.update()
        assert sub.ranks() == oracle.ranks() == {"0": 3, "2": 3}, (sub.ranks(), oracle.ranks())
        for a, b in zip(_projectors(sub), _projectors(oracle)):
            assert (a - b).abs().max() < 1e-10

        old = [p.detach().clone() for p in model.parameters()]
        h = model[0](data).detach()
        opt = ProjectedOptimizer(torch.optim.AdamW(ddp.parameters(), lr=1e-2), activation_subspace=sub)
        opt.zero_grad()
        ddp(_safety(rank)).square().mean().backward()   # each rank its own safety batch; DDP averages
        opt.step()
        for i, p in enumerate(model.parameters()):
            _same_on_all_ranks(p, f"parameter {i} after the step")
        for (w, o), x in zip(((model[0].weight, old[0]), (model[2].weight, old[1])), (data, h)):
            dw = w.detach() - o
            assert dw.norm() > 1e-6
            assert ((dw @ x.t()).norm(dim=0) <= 1e-9 * dw.norm() * x.norm(dim=1)).all()
        _same_on_all_ranks(opt.last_stats.update_removed_fraction.reshape(1), "update_removed_fraction")
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank, world, port):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    _init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        data = _data()
        half = data[rank * 20:(rank + 1) * 20]
        model = _model()
        ref_model = copy.deepcopy(model)
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        sub = ActivationSubspace(model, energy=1.0, basis_dtype=torch.float64)
        with torch.no_grad(), sub.observe():
            model(half)
        sub.update()
        ref_sub = ActivationSubspace(ref_model, energy=1.0, basis_dtype=torch.float64)
        ref_sub._all_reduce = lambda: None
        with torch.no_grad(), ref_sub.observe():
            ref_model(data)
        ref_sub.update()
        for a, b in zip(_projectors(sub), _projectors(ref_sub)):
            assert (a - b).abs().max() < 1e-10
        opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), activation_subspace=sub)
        ref_opt = ProjectedOptimizer(torch.optim.SGD(ref_model.parameters(), lr=0.1), activation_subspace=ref_sub)
        s = torch.cat([_safety(0), _safety(1)])
        opt.zero_grad()
        model(s[rank * 10:(rank + 1) * 10]).square().sum().div(20).backward()
        opt.step()
        ref_opt.zero_grad()
        ref_model(s).square().sum().div(40).backward()  # FSDP averages the ranks' gradients
        ref_opt.step()
        assert float(opt.last_stats.update_removed_fraction) > 0.1  # the projection acted (on the local shards)
        for i, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
            full = p.full_tensor()
            assert torch.allclose(full, q, rtol=1e-10, atol=1e-12), f"parameter {i}"
    finally:
        dist.destroy_process_group()


def test_ddp_bases_and_replicas_bit_identical():
    _spawn(_ddp_worker, WORLD)


def test_fsdp2_row_shards_project_locally():
    _spawn(_fsdp_worker, WORLD)
