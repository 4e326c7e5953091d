"""Distributed projection on CPU/gloo: DDP, FSDP2 (fully_shard), HSDP 2x2, GradScaler, project_model_.

Multi-process tests start their ranks with ``torch.multiprocessing.spawn``; every rank checks its own
results against a single-process projection of the full (gathered) tensors and raises on mismatch.
"""
from __future__ import annotations

import copy
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import atax_kernels
from atax_kernels import Subspace, project_, project_model_

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is required")

TOL = dict(rtol=1e-5, atol=1e-7)


# --- helpers -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_and_exit(rank: int, fn, *args) -> None:
    """Run one rank's checks; on success leave without interpreter teardown. A rank that had finished (and
    destroyed its process group) still aborted once in CI at exit ("terminate called without an active
    exception": gloo threads racing shutdown); a failing rank raises as usual, so spawn reports it."""
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(fn, nprocs: int, *args) -> None:
    for attempt in range(3):
        try:
            mp.spawn(_run_and_exit, args=(fn, nprocs, _free_port(), *args), nprocs=nprocs, join=True)
            return
        except Exception as exc:  # a probed free port can be taken before the store binds it: retry that only
            text = str(exc).lower()
            if attempt == 2 or not ("address already in use" in text or "eaddrinuse" in text):
                raise


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _model(seed: int = 0) -> torch.nn.Module:
    # Linear(5, 1): its weight [1, 5] and bias [1] leave empty local shards on some ranks.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def _batches(n: int = 8):
    g = torch.Generator().manual_seed(1234)
    xs, ys = torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)
    xc, yc = torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)
    xd, yd = torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)
    return (xs, ys), (xc, yc), (xd, yd)


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _part(batch, rank: int, world: int):
    n = batch[0].shape[0] // world
    return tuple(t[rank * n:(rank + 1) * n] for t in batch)


def _close(a, b, what: str, **tol) -> None:
    tol = tol or TOL
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if not torch.allclose(a, b, **tol):
        raise AssertionError(f"{what}: {a.tolist()} != {b.tolist()}")


def _same_stats(got, want, what: str) -> None:
    for f in ("dots", "cosines", "coefs", "removed_fraction"):
        _close(getattr(got, f), getattr(want, f), f"{what}: {f}")
    assert bool(got.skipped) == bool(want.skipped), what
    assert bool(got.projected) == bool(want.projected), what


def _train(model, safety, cap, steps: int, params_of=None, backward_model=None):
    """``steps`` of: safety backward, project_model_ (callable reference), clip, SGD. Returns the stats."""
    fwd = backward_model or model
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    out = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        _loss(fwd, safety).backward()
        out.append(project_model_(fwd.parameters(), lambda: _loss(fwd, cap), mode="conflict"
                                  if len(out) % 2 else "orthogonal"))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return out


# --- DDP ----------------------------------------------------------------------------------------------

def _ddp_worker(rank, world, port, outdir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, world, port)
    try:
        safety, cap, _ = _batches()
        results = {}
        for name, kw in (("plain", {}), ("bucket_view", dict(gradient_as_bucket_view=True))):
            model = _model()
            ddp = DDP(model, **kw)
            stats = _train(model, _part(safety, rank, world), _part(cap, rank, world), 3, backward_model=ddp)
            if name == "bucket_view":
                # The projected safety gradient was written back into DDP's bucket views.
                assert all(p.grad is not None and p.grad._base is not None for p in model.parameters())
            results[name] = dict(params=[p.detach().clone() for p in model.parameters()],
                                 coefs=[s.coefs.clone() for s in stats], dots=[s.dots.clone() for s in stats])
        torch.save(results, os.path.join(outdir, f"ddp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path):
    """2-rank DDP with project_model_ every step: ranks agree and match one process on the global batch."""
    _spawn(_ddp_worker, 2, str(tmp_path))
    safety, cap, _ = _batches()
    single = _model()
    stats = _train(single, safety, cap, 3)
    r0, r1 = (torch.load(tmp_path / f"ddp{r}.pt") for r in range(2))
    for name in ("plain", "bucket_view"):
        for a, b, c in zip(r0[name]["params"], r1[name]["params"], single.parameters()):
            assert torch.equal(a, b), f"{name}: parameters differ between ranks"
            _close(a, c, f"{name}: DDP vs single process", rtol=1e-5, atol=1e-6)
        for step, s in enumerate(stats):
            _close(r0[name]["dots"][step], s.dots, f"{name} step {step} dots", rtol=1e-4, atol=1e-7)
            _close(r0[name]["coefs"][step], s.coefs, f"{name} step {step} coefs", rtol=1e-4, atol=1e-7)
    assert any(bool((s.coefs != 0).any()) for s in stats), "the test never projected anything"


# --- FSDP2 --------------------------------------------------------------------------------------------

def _sharded_grads(model, batch):
    model.zero_grad(set_to_none=True)
    _loss(model, batch).backward()
    grads = [p.grad for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return grads


def _check_against_full(grads_dt, refs_dt, configs, what):
    """project_ on DTensor shards == project_ on the gathered full tensors in one process."""
    full_g = [g.full_tensor() for g in grads_dt]
    full_r = [[r.full_tensor() for r in lst] for lst in refs_dt]
    # Conflict mode needs conflicts: orient every reference against the gradient (same sign on every rank).
    signs = [-1.0 if sum(float((a * b).sum()) for a, b in zip(full_g, lst)) > 0 else 1.0 for lst in full_r]
    for mode, gran, k, backend in configs:
        g = [t.clone() for t in grads_dt]
        refs = [[t.clone() for t in lst] for lst in refs_dt[:k]]
        want_r = full_r
        if mode == "conflict":
            refs = [[t * sign for t in lst] for lst, sign in zip(refs, signs)]
            want_r = [[t * sign for t in lst] for lst, sign in zip(full_r, signs)]
        stats = project_(g, refs if k > 1 else refs[0], mode=mode, granularity=gran, backend=backend)
        want_g = [t.clone() for t in full_g]
        want = project_(want_g, want_r[:k] if k > 1 else want_r[0], mode=mode, granularity=gran, backend="torch")
        label = f"{what} {mode}/{gran}/k={k}/{backend}"
        _same_stats(stats, want, label)
        for a, b in zip(g, want_g):
            _close(a.full_tensor(), b, f"{label}: projected gradient")
        assert bool(want.projected), f"{label}: nothing projected, the test is vacuous"


CONFIGS = [("orthogonal", "global", 1, "torch"), ("conflict", "global", 2, "torch"),
           ("orthogonal", "tensor", 2, "torch"), ("conflict", "tensor", 1, None), ("orthogonal", "global", 2, None)]


def _fsdp_worker(rank, world, port):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    _init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = _model()
        unsharded = copy.deepcopy(model)
        fully_shard(model, mesh=mesh)
        safety, cap, cap2 = _batches()
        S = _sharded_grads(model, _part(safety, rank, world))
        R = [_sharded_grads(model, _part(b, rank, world)) for b in (cap, cap2)]
        assert all(isinstance(t, DTensor) and t.placements == (Shard(0),) for t in S)
        assert any(t.to_local().numel() == 0 for t in S) == (rank == world - 1)  # empty local shards on the last rank

        # FSDP2's gradients are the full-batch gradients of the unsharded model.
        for g, p in zip(S, _grad(unsharded, safety)):
            _close(g.full_tensor(), p, "fsdp gradient vs unsharded")

        _check_against_full(S, R, CONFIGS, "fsdp2")

        # Mixed reduction classes: a plain tensor (identical on every rank) next to the shards.
        extra = [torch.arange(4.0), torch.ones(4), torch.tensor([1.0, -1.0, 2.0, 0.5])]
        g = [t.clone() for t in S] + [extra[0].clone()]
        refs = [[t.clone() for t in R[0]] + [extra[1].clone()], [t.clone() for t in R[1]] + [extra[2].clone()]]
        full_g = [t.full_tensor() for t in S] + [extra[0].clone()]
        full_r = [[t.full_tensor() for t in R[0]] + [extra[1]], [t.full_tensor() for t in R[1]] + [extra[2]]]
        for gran in ("global", "tensor"):
            gg, rr = [t.clone() for t in g], [[t.clone() for t in lst] for lst in refs]
            fg = [t.clone() for t in full_g]
            _same_stats(project_(gg, rr, granularity=gran), project_(fg, full_r, granularity=gran), f"mixed {gran}")
            for a, b in zip(gg, fg):
                _close(a.full_tensor() if isinstance(a, DTensor) else a, b, f"mixed {gran}: projected gradient")

        # Skip decision is collective: an inf on one rank's shard leaves every rank's gradient untouched.
        g = [t.clone() for t in S]
        if rank == 1:
            g[0].to_local()[0, 0] = float("inf")
        before = [t.to_local().clone() for t in g]
        for backend in ("torch", None):
            stats = project_(g, [t.clone() for t in R[0]], backend=backend)
            assert bool(stats.skipped) and stats.reason is not None, f"rank {rank} did not skip"
            assert all(torch.equal(a.to_local(), b) for a, b in zip(g, before))

        # project_model_ with a callable reference on the sharded model.
        model.zero_grad(set_to_none=True)
        _loss(model, _part(safety, rank, world)).backward()
        stats = project_model_(model.parameters(), lambda: _loss(model, _part(cap, rank, world)))
        want_g = [t.full_tensor() for t in S]
        want = project_(want_g, [t.full_tensor() for t in R[0]], backend="torch")
        _same_stats(stats, want, "project_model_ on fsdp2")
        for p, b in zip(model.parameters(), want_g):
            _close(p.grad.full_tensor(), b, "project_model_ on fsdp2: gradient")

        # process_group: plain tensors that are disjoint shards of one gradient (FSDP1/ZeRO-style).
        params = [torch.nn.Parameter(t.to_local().clone()) for t in S]
        for p, t in zip(params, S):
            p.grad = t.to_local().clone()
        stats = project_model_(params, [t.to_local().clone() for t in R[0]], process_group=dist.group.WORLD)
        _same_stats(stats, want, "process_group shards")
        # ... and the error cases.
        try:
            project_model_(model.parameters(), [t.clone() for t in R[0]], process_group=dist.group.WORLD)
        except ValueError as exc:
            assert "process_group" in str(exc)
        else:
            raise AssertionError("DTensor gradients with process_group were accepted")
        partial = DTensor.from_local(torch.ones(3), mesh, [Partial()])
        replicated = DTensor.from_local(torch.ones(3), mesh, [Replicate()])
        for bad_g, bad_r, msg in ((partial, partial.clone(), "Partial"), (replicated.clone(), torch.ones(3), "DTensor"),
                                  (replicated.clone(), DTensor.from_local(torch.ones(2), mesh, [Shard(0)],
                                                                          shape=(3,), stride=(1,)), "placements")):
            try:
                project_([bad_g], [bad_r])
            except ValueError as exc:
                assert msg in str(exc), str(exc)
            else:
                raise AssertionError(f"bad DTensor input accepted ({msg})")
    finally:
        dist.destroy_process_group()


def _grad(model, batch):
    model.zero_grad(set_to_none=True)
    _loss(model, batch).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_fsdp2_global_dots():
    """2-rank fully_shard: Gram/dots/coefficients and projected full gradients equal one process's."""
    _spawn(_fsdp_worker, 2)


def _hsdp_worker(rank, world, port):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard

    _init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        model = _model()
        fully_shard(model, mesh=mesh)
        safety, cap, cap2 = _batches()
        S = _sharded_grads(model, _part(safety, rank, world))
        R = [_sharded_grads(model, _part(b, rank, world)) for b in (cap, cap2)]
        assert S[0].placements == (Replicate(), Shard(0))
        _check_against_full(S, R, [("orthogonal", "global", 2, "torch"), ("conflict", "tensor", 1, "torch")], "hsdp")
        # Summing over the whole world would count each shard twice (once per replica).
        from atax_kernels.distributed import gram_all_reducer
        from atax_kernels.ops import gram

        local = [t.to_local() for t in S]
        world_sum = gram_all_reducer(dist.group.WORLD)(gram([local]))
        _close(world_sum, 2 * gram([[t.full_tensor() for t in S]]), "world all-reduce double counts")
    finally:
        dist.destroy_process_group()


def test_hsdp_2x2_matches_single_process():
    """4-rank HSDP (Replicate x Shard mesh): the Gram is reduced over the shard dimension only."""
    _spawn(_hsdp_worker, 4)


# --- single process -----------------------------------------------------------------------------------

def test_grad_scaler_plain_loop():
    """GradScaler("cpu"): scaled safety and capability backwards, project, unscale_, clip, step."""
    safety, cap, _ = _batches()
    plain, scaled = _model(), _model()
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.2)
    opt_s = torch.optim.SGD(scaled.parameters(), lr=0.2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for step in range(3):
        mode = "conflict" if step % 2 else "orthogonal"
        opt_p.zero_grad()
        _loss(plain, safety).backward()
        want = project_model_(plain.parameters(), lambda: _loss(plain, cap), mode=mode)
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt_p.step()

        opt_s.zero_grad()
        scaler.scale(_loss(scaled, safety)).backward()
        got = project_model_(scaled.parameters(), lambda: scaler.scale(_loss(scaled, cap)) * 3.0, mode=mode)
        scaler.unscale_(opt_s)
        torch.nn.utils.clip_grad_norm_(scaled.parameters(), 1.0)
        scaler.step(opt_s)
        scaler.update()
        _close(got.cosines, want.cosines, "cosines under scaling")
        _close(got.removed_fraction, want.removed_fraction, "removed fraction under scaling")
    for a, b in zip(plain.parameters(), scaled.parameters()):
        _close(a, b, "scaled vs unscaled training", rtol=1e-5, atol=1e-6)


def _grads_and_caps(model):
    safety, cap, cap2 = _batches()
    caps = [_grad(model, cap), _grad(model, cap2)]
    model.zero_grad()
    _loss(model, safety).backward()
    return [p.grad.clone() for p in model.parameters()], caps


@pytest.mark.parametrize("kind", ["list", "lists", "subspace", "callable"])
def test_project_model_reference_kinds(kind):
    model = _model()
    safety_grads, caps = _grads_and_caps(model)
    params = list(model.parameters())
    want_g = [g.clone() for g in safety_grads]
    if kind == "list":
        ref, want_ref = caps[0], caps[0]
    elif kind == "lists":
        ref, want_ref = caps, caps
    elif kind == "subspace":
        ref = Subspace(params, max_rank=2)
        ref.add(caps)
        want_ref = ref
    else:
        _, cap, _ = _batches()
        ref, want_ref = (lambda: _loss(model, cap)), caps[0]
    want = project_(want_g, want_ref)
    stats = project_model_(model, ref)
    _same_stats(stats, want, kind)
    for p, b in zip(params, want_g):
        _close(p.grad, b, f"{kind}: projected gradient")


def test_project_model_missing_grads():
    """Params without .grad are left out; None reference entries count as zero."""
    model = _model()
    safety_grads, caps = _grads_and_caps(model)
    params = list(model.parameters())
    params[1].grad = None
    ref = list(caps[0])
    ref[3] = None
    keep = [0, 2, 3]
    want_g = [safety_grads[i].clone() for i in keep]
    want = project_(want_g, [caps[0][0], caps[0][2], torch.zeros_like(caps[0][3])])
    _same_stats(project_model_(params, ref), want, "missing grads")
    assert params[1].grad is None
    for i, b in zip(keep, want_g):
        _close(params[i].grad, b, "missing grads: gradient")
    # A Subspace over all params still works when one has no gradient.
    sub = Subspace(params, max_rank=1)
    sub.add(caps[0])
    params[0].grad = safety_grads[0].clone()
    params[2].grad = safety_grads[2].clone()
    params[3].grad = safety_grads[3].clone()
    want_g = [safety_grads[i].clone() for i in keep]
    want = project_(want_g, [[sub.basis[0][i] for i in keep]])
    _same_stats(project_model_(params, sub), want, "subspace with a missing grad")


def test_project_model_callable_bucket_views():
    """Gradients that are views of one flat bucket stay those views (DDP gradient_as_bucket_view)."""
    model = _model()
    safety_grads, caps = _grads_and_caps(model)
    params = list(model.parameters())
    bucket = torch.zeros(sum(p.numel() for p in params))
    views, off = [], 0
    for p, g in zip(params, safety_grads):
        v = bucket[off:off + p.numel()].view_as(p)
        v.copy_(g)
        p.grad = v
        views.append(v)
        off += p.numel()
    _, cap, _ = _batches()
    want_g = [g.clone() for g in safety_grads]
    want = project_(want_g, caps[0])
    stats = project_model_(params, lambda: _loss(model, cap))
    _same_stats(stats, want, "bucket views")
    for p, v, b in zip(params, views, want_g):
        assert p.grad is v and p.grad._base is bucket
        _close(p.grad, b, "bucket views: gradient")


def test_project_model_callable_error_restores_grads():
    model = _model()
    safety_grads, _ = _grads_and_caps(model)
    params = list(model.parameters())

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        project_model_(params, broken)
    for p, g in zip(params, safety_grads):
        assert torch.equal(p.grad, g)
    with pytest.raises(TypeError, match="loss tensor"):
        project_model_(params, lambda: 1.0)
    for p, g in zip(params, safety_grads):
        assert torch.equal(p.grad, g)


def test_project_model_accelerator_backward():
    """With an accelerator, the capability loss goes through accelerator.backward (duck-typed here)."""
    model = _model()
    safety_grads, caps = _grads_and_caps(model)
    calls = []

    class FakeAccelerator:
        distributed_type = "NO"

        def backward(self, loss):
            calls.append(float(loss.detach()))
            (loss / 4).backward()  # e.g. gradient accumulation: a scaled reference changes nothing

    _, cap, _ = _batches()
    want_g = [g.clone() for g in safety_grads]
    want = project_(want_g, caps[0])
    stats = project_model_(model.parameters(), lambda: _loss(model, cap), accelerator=FakeAccelerator())
    assert len(calls) == 1
    _close(stats.coefs, want.coefs * 4, "accelerator: coefs scale with 1/scale of the reference")
    for p, b in zip(model.parameters(), want_g):
        _close(p.grad, b, "accelerator: gradient")


def test_project_model_refuses_zero_and_flat_params():
    model = _model()
    _grads_and_caps(model)
    params = list(model.parameters())

    class DeepSpeedAccelerator:
        distributed_type = "DistributedType.DEEPSPEED"

    with pytest.raises(NotImplementedError, match="ZeRO.*attach_engine"):
        project_model_(params, lambda: None, accelerator=DeepSpeedAccelerator())
    params[0].ds_id = 0
    with pytest.raises(NotImplementedError, match="ZeRO.*attach_engine"):
        project_model_(params, [p.grad.clone() for p in params])
    del params[0].ds_id

    class Fsdp1Accelerator:
        distributed_type = "DistributedType.FSDP"
        is_fsdp2 = False

    with pytest.raises(ValueError, match="process_group"):
        project_model_(params, [p.grad.clone() for p in params], accelerator=Fsdp1Accelerator())
    params[0]._is_flat_param = True
    with pytest.raises(ValueError, match="process_group"):
        project_model_(params, [p.grad.clone() for p in params])
    del params[0]._is_flat_param


def test_project_without_dtensor_does_not_import_it():
    """The DTensor check costs nothing when torch.distributed.tensor was never imported."""
    import subprocess

    code = ("import sys, torch, atax_kernels as a; g=[torch.ones(3)]; a.project_(g, [torch.ones(3)]);"
            "assert 'torch.distributed.tensor' not in sys.modules, 'imported'; print(g[0].abs().max().item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 1e-6
