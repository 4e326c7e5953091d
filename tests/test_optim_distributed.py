"""ProjectedOptimizer under FSDP2 (fully_shard, 2 ranks, CPU/gloo) against a single-process run.

Every rank runs the wrapper on the sharded model with its half of each batch, and the same wrapper on an
unsharded copy with the whole batch; parameters (gathered), statistics and EMA buffers must agree, and the
statistics must be identical on every rank.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from atax_kernels import ProjectedOptimizer, Subspace
from test_distributed import _close, _init, _part, _spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is required")

TOL = dict(rtol=1e-4, atol=1e-6)
STEPS = 3

CONFIGS = {
    "grad_live": dict(target="grad"),
    "grad_live_tensor_ptx": dict(target="grad", granularity="tensor", ptx_weight=0.3, backend="torch"),
    "grad_conflict_k2": dict(target="grad", mode="conflict", strength=0.7),
    "update_live": dict(target="update"),
    "update_live_k2": dict(target="update", granularity="tensor"),
    "grad_ema": dict(target="grad", reference="ema", ema_beta=0.5),
    "update_ema": dict(target="update", reference="ema", ema_beta=0.5),
    # Step 1's capture holds an inf in rank 1's shard only: every rank must skip folding it (a global decision).
    "grad_ema_inf": dict(target="grad", reference="ema", ema_beta=0.5),
}
POISON_STEP = 1


def _model(seed: int = 0) -> torch.nn.Module:
    # Linear(5, 1): its weight [1, 5] and bias [1] leave empty local shards on rank 1.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def _step_batches(step: int, n: int = 8):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)) for _ in range(3)]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _poison(capture: list, rank: int | None) -> None:
    """inf into element [3, 0] of the first layer's weight: on the full tensor, or in rank 1's shard (rows 3-4)."""
    t = capture[0]
    if rank is None:
        t[3, 0] = float("inf")
    elif rank == 1:
        t.to_local()[0, 0] = float("inf")


def _run(model, kw: dict, refs_per_step: int, part=None, poison_rank=False, rank=None) -> list:
    """STEPS of: capability backward(s) -> capture_reference -> safety backward -> step. Returns stats."""
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01), **kw)
    out = []
    for step in range(STEPS):
        safety, *caps = _step_batches(step)
        if part is not None:
            safety, caps = part(safety), [part(c) for c in caps]
        opt.zero_grad()
        for cap in caps[:refs_per_step]:
            _loss(model, cap).backward()
            opt.capture_reference()
            if poison_rank and step == POISON_STEP:
                _poison(opt._pending[-1][0], rank)
        _loss(model, safety).backward()
        opt.step()
        out.append(opt.last_stats)
    return out, opt


def _worker(rank, world, port):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    _init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for name, kw in CONFIGS.items():
            k = 2 if name.endswith("k2") or "ptx" in name else 1
            base = _model()
            ref_model = copy.deepcopy(base)
            poison = name.endswith("_inf")
            want, want_opt = _run(ref_model, kw, k, poison_rank=poison)

            fully_shard(base[0], mesh=mesh)
            fully_shard(base[2], mesh=mesh)
            fully_shard(base, mesh=mesh)
            got, got_opt = _run(base, kw, k, part=lambda b: _part(b, rank, world), poison_rank=poison, rank=rank)
            assert all(isinstance(p, DTensor) for p in base.parameters())

            for step, (g, w) in enumerate(zip(got, want)):
                label = f"{name} step {step}"
                for f in ("dots", "cosines", "coefs", "removed_fraction"):
                    _close(getattr(g, f), getattr(w, f), f"{label}: {f}", **TOL)
                assert bool(g.projected) == bool(w.projected) and bool(g.skipped) == bool(w.skipped), label
                # Identical (not just close) on every rank: one all-reduced Gram, one solve.
                mine = torch.cat([g.dots, g.coefs.reshape(-1)]).double()
                gathered = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(gathered, mine)
                assert all(torch.equal(t, gathered[0]) for t in gathered), f"{label}: stats differ across ranks"
            assert any(bool(w.projected) for w in want), f"{name}: nothing projected, the test is vacuous"
            for i, (p, q) in enumerate(zip(base.parameters(), ref_model.parameters())):
                _close(p.full_tensor(), q, f"{name}: parameter {i}", **TOL)
            if kw.get("reference") == "ema":
                # Every capture folded on every rank (rank 1 holds only empty shards of the last layer).
                folded = [STEPS - 1] if poison else [STEPS]
                assert got_opt._ema_count == want_opt._ema_count == folded, (got_opt._ema_count, want_opt._ema_count)
                for i, (e, f) in enumerate(zip(got_opt._ema[0], want_opt._ema[0])):
                    assert isinstance(e, DTensor)
                    _close(e.full_tensor(), f, f"{name}: EMA buffer {i}", **TOL)

        # Plain single-process run without projection still differs: the projection actually acted.
        plain = _model()
        opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.01)
        for step in range(STEPS):
            safety, *_ = _step_batches(step)
            opt.zero_grad()
            _loss(plain, safety).backward()
            opt.step()
        assert not all(torch.allclose(p, q, **TOL) for p, q in zip(plain.parameters(), ref_model.parameters()))

        # A Subspace over sharded parameters is refused clearly (its orthonormalisation uses local dots).
        base = _model()
        fully_shard(base, mesh=mesh)
        sub = Subspace(base.parameters(), max_rank=2)
        try:
            ProjectedOptimizer(torch.optim.SGD(base.parameters(), lr=0.1), subspace=sub)
        except NotImplementedError as exc:
            assert "Subspace" in str(exc)
        else:
            raise AssertionError("a Subspace over DTensor parameters was accepted")
        sgd = torch.optim.SGD(base.parameters(), lr=0.1)
        popt = ProjectedOptimizer(sgd)
        popt.subspace = sub  # set after construction: step() refuses it too
        _loss(base, _part(_step_batches(0)[0], rank, world)).backward()
        try:
            popt.step()
        except NotImplementedError as exc:
            assert "Subspace" in str(exc)
        else:
            raise AssertionError("step() with a Subspace over DTensor parameters was accepted")
    finally:
        dist.destroy_process_group()


def test_projected_optimizer_fsdp2_matches_single_process():
    """grad/update targets, live/EMA references, PTX, tensor granularity: FSDP2 == one process."""
    _spawn(_worker, 2)
