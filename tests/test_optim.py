"""ProjectedOptimizer: a drop-in Optimizer; live/EMA/subspace references; AMP; checkpoints."""
from __future__ import annotations

import copy

import pytest
import torch

import atax_kernels
import oracle
from atax_kernels import ProjectedOptimizer, Subspace


class Scaled(torch.optim.Optimizer):
    """A custom optimizer (plain SGD with a per-group 'scale') to prove any Optimizer subclass works."""

    def __init__(self, params, lr=0.1, scale=1.0):
        super().__init__(params, dict(lr=lr, scale=scale))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] * group["scale"])


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _losses(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x_cap, x_saf = torch.randn(16, 6, generator=gen), torch.randn(16, 6, generator=gen)
    y_cap, y_saf = torch.randn(16, 3, generator=gen), torch.randn(16, 3, generator=gen)
    cap = lambda: ((model(x_cap) - y_cap) ** 2).mean()  # noqa: E731
    saf = lambda: ((model(x_saf) + y_saf) ** 2).mean()  # noqa: E731
    return cap, saf


def _grads_of(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    out = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def test_is_an_optimizer_sharing_state_and_groups():
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = ProjectedOptimizer(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    assert not hasattr(opt, "_step_supports_amp_scaling")
    extra = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert inner.param_groups[-1]["params"][0] is extra
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    cap, saf = _losses(model)
    saf().backward()
    opt.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_live_capture_is_zero_copy_and_step_consumes():
    model = _model()
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    cap, saf = _losses(model)
    cap().backward()
    ptrs = [p.grad.data_ptr() for p in model.parameters()]
    opt.capture_reference()
    assert all(p.grad is None for p in model.parameters())
    assert [t.data_ptr() for t in opt._pending[0][0]] == ptrs
    assert opt.num_references == 1
    saf().backward()
    opt.step()
    assert opt.num_references == 0 and bool(opt.last_stats.projected)


@pytest.mark.parametrize("inner_cls", [torch.optim.SGD, Scaled])
@pytest.mark.parametrize("mode", ["orthogonal", "conflict"])
def test_gradient_projection_matches_oracle(inner_cls, mode):
    model = _model()
    cap, saf = _losses(model)
    c = _grads_of(model, cap)
    g = _grads_of(model, saf)
    expected = oracle.project(g, [c], mode)
    before = [p.detach().clone() for p in model.parameters()]
    opt = ProjectedOptimizer(inner_cls(model.parameters(), lr=1.0), mode=mode)
    cap().backward()
    opt.capture_reference()
    saf().backward()
    opt.step()
    applied = [b - p.detach() for b, p in zip(before, model.parameters())]
    err = float((oracle.flat64(applied) - oracle.flat64(expected)).norm())
    assert err <= 1e-5 * float(oracle.flat64(g).norm())


@pytest.mark.parametrize("inner_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_update_projection_is_orthogonal_to_references(inner_cls):
    model = _model()
    cap, saf = _losses(model)
    refs = [_grads_of(model, cap), _grads_of(model, lambda: cap() * 0 + (model(torch.ones(4, 6)) ** 2).mean())]
    opt = ProjectedOptimizer(inner_cls(model.parameters(), lr=1e-2), target="update")
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        for loss in (cap, lambda: (model(torch.ones(4, 6)) ** 2).mean()):
            loss().backward()
            opt.capture_reference()
        refs = [[t.clone() for t in r] for r, _ in opt._pending]
        saf().backward()
        opt.step()
        update = oracle.flat64([p.detach() - b for b, p in zip(before, model.parameters())])
        assert float(update.norm()) > 0
        for r in refs:
            rr = oracle.flat64(r)
            assert abs(float(update @ rr)) <= 1e-5 * float(update.norm() * rr.norm())


def test_ptx_adds_mean_of_unscaled_references():
    model = _model()
    cap, saf = _losses(model)
    c = _grads_of(model, cap)
    g = _grads_of(model, saf)
    proj = oracle.project(g, [c])
    lam = 0.3
    expected = [p + lam * ci.double() for p, ci in zip(proj, c)]
    before = [p.detach().clone() for p in model.parameters()]
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), ptx_weight=lam)
    cap().backward()
    opt.capture_reference()
    saf().backward()
    opt.step()
    applied = [b - p.detach() for b, p in zip(before, model.parameters())]
    assert float((oracle.flat64(applied) - oracle.flat64(expected)).norm()) <= 1e-5 * float(oracle.flat64(g).norm())


def test_refusals_and_bad_settings():
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="ptx_weight > 0 needs target='grad'"):
        ProjectedOptimizer(inner, ptx_weight=0.1, target="update")
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        ProjectedOptimizer(model)
    with pytest.raises(ValueError, match="unknown target"):
        ProjectedOptimizer(inner, target="weights")
    with pytest.raises(ValueError, match="strength must be in"):
        ProjectedOptimizer(inner, strength=2.0)
    with pytest.raises(ValueError, match="ema_beta"):
        ProjectedOptimizer(inner, reference="ema", ema_beta=1.0)
    opt = ProjectedOptimizer(inner, max_references=1)
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        opt.capture_reference()
    cap, _ = _losses(model)
    cap().backward()
    opt.capture_reference()
    cap().backward()
    with pytest.raises(ValueError, match="max_references=1"):
        opt.capture_reference()


def test_no_reference_is_a_plain_step():
    model = _model()
    twin = copy.deepcopy(model)
    cap, saf = _losses(model)
    _, saf2 = _losses(twin)
    opt = ProjectedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
    ref = torch.optim.Adam(twin.parameters(), lr=1e-2)
    saf().backward()
    saf2().backward()
    opt.step()
    ref.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert not bool(opt.last_stats.projected)


def test_library_warnings_point_at_the_users_line():
    model = _model()
    _, saf = _losses(model)
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2))
    saf().backward()
    with pytest.warns(UserWarning, match="no references") as record:
        opt.step()
    assert record[0].filename == __file__


def test_nonfinite_capability_gradient_never_reaches_weights():
    model = _model()
    cap, saf = _losses(model)
    g = _grads_of(model, saf)
    before = [p.detach().clone() for p in model.parameters()]
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0))
    cap().backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.capture_reference()
    saf().backward()
    opt.step()
    assert bool(opt.last_stats.skipped) and "reference 0" in opt.last_stats.reason
    applied = [b - p.detach() for b, p in zip(before, model.parameters())]
    assert all(torch.isfinite(a).all() for a in applied)
    assert float((oracle.flat64(applied) - oracle.flat64(g)).norm()) <= 1e-6 * float(oracle.flat64(g).norm())


def test_grad_scaler_sees_unscaled_and_skips_inf_steps():
    model = _model()
    cap, saf = _losses(model)
    c, g = _grads_of(model, cap), _grads_of(model, saf)
    expected = oracle.project(g, [c])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), reference="ema", scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(cap()).backward()
    opt.capture_reference()
    scaler.scale(saf()).backward()
    scaler.step(opt)
    scaler.update()
    applied = [b - p.detach() for b, p in zip(before, model.parameters())]
    assert float((oracle.flat64(applied) - oracle.flat64(expected)).norm()) <= 1e-5 * float(oracle.flat64(g).norm())
    # The EMA holds the unscaled capability gradient.
    assert float((oracle.flat64(opt._ema[0]) - oracle.flat64(c)).norm()) <= 1e-6 * float(oracle.flat64(c).norm())
    ema_before = [t.clone() for t in opt._ema[0]]
    params_before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(cap()).backward()
    opt.capture_reference()
    scaler.scale(saf() * float("inf")).backward()
    scaler.step(opt)  # skipped: inf in the safety gradient
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema_before, opt._ema[0]))
    opt.zero_grad()
    assert opt.num_references == 1  # only the persistent EMA slot


def test_bf16_autocast_and_accumulation_and_clipping():
    model = _model()
    cap, saf = _losses(model)
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cap().backward()
    opt.capture_reference()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saf().backward()
        saf().backward()  # gradient accumulation: two micro-batches
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    applied = oracle.flat64([b - p.detach() for b, p in zip(before, model.parameters())])
    assert float(applied.norm()) <= 0.05 * (1 + 1e-5)
    assert bool(opt.last_stats.projected)


def test_zero_gradients_and_zero_lr_change_nothing():
    model = _model()
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), reference="ema")
    cap, saf = _losses(model)
    cap().backward()
    opt.capture_reference()
    saf().backward()
    opt.step()
    ema = [t.clone() for t in opt._ema[0]]
    params = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.capture_reference()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ema, opt._ema[0]))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("reference", ["live", "ema"])
def test_state_dict_round_trip_gives_bit_identical_next_step(reference):
    model = _model()
    cap, saf = _losses(model)
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), reference=reference,
                             reference_dtype=torch.bfloat16 if reference == "ema" else None)
    for _ in range(2):
        opt.zero_grad()
        cap().backward()
        opt.capture_reference()
        saf().backward()
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    twin_opt = ProjectedOptimizer(torch.optim.AdamW(twin.parameters(), lr=1e-2), reference=reference,
                                  reference_dtype=torch.bfloat16 if reference == "ema" else None)
    twin_opt.load_state_dict(state)
    for m, o in ((model, opt), (twin, twin_opt)):
        c2, s2 = _losses(m, seed=5)
        o.zero_grad()
        c2().backward()
        o.capture_reference()
        s2().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    with pytest.raises(ValueError, match="not produced by ProjectedOptimizer"):
        twin_opt.load_state_dict({"optimizer": opt.optimizer.state_dict()})


def test_reference_fn_drop_in_projects_inside_step():
    model = _model()
    cap, saf = _losses(model)
    c, g = _grads_of(model, cap), _grads_of(model, saf)
    expected = oracle.project(g, [c])
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), reference_fn=cap)
    before = [p.detach().clone() for p in model.parameters()]
    saf().backward()
    opt.step()
    applied = [b - p.detach() for b, p in zip(before, model.parameters())]
    assert float((oracle.flat64(applied) - oracle.flat64(expected)).norm()) <= 1e-5 * float(oracle.flat64(g).norm())
    assert bool(opt.last_stats.projected)


def test_frozen_params_groups_and_missing_gradients():
    model = _model()
    layers = list(model.children())
    for p in layers[0].parameters():
        p.requires_grad_(False)
    head = list(layers[2].parameters())
    opt = ProjectedOptimizer(torch.optim.SGD([{"params": head[:1], "lr": 1.0}, {"params": head[1:], "lr": 0.5},
                                              {"params": list(layers[0].parameters()), "lr": 1.0}]))
    cap, saf = _losses(model)
    cap().backward()
    opt.capture_reference()
    saf().backward()
    head[1].grad = None  # a parameter without a gradient this step
    opt.step()
    assert bool(opt.last_stats.projected)


def test_bucket_view_gradients_are_cloned_on_capture():
    model = _model()
    params = list(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in params))
    cap, _ = _losses(model)
    cap().backward()
    pos = 0
    for p in params:
        view = flat[pos:pos + p.numel()].view_as(p)
        view.copy_(p.grad)
        p.grad = view
        pos += p.numel()
    opt = ProjectedOptimizer(torch.optim.SGD(params, lr=0.1))
    opt.capture_reference()
    stored = opt._pending[0][0]
    assert all(t._base is None for t in stored)
    flat.zero_()
    assert float(oracle.flat64(stored).norm()) > 0


def test_subspace_basis_and_projection():
    gen = torch.Generator().manual_seed(0)
    params = [torch.zeros(5, 4), torch.zeros(7)]
    vecs = [[torch.randn(5, 4, generator=gen), torch.randn(7, generator=gen)] for _ in range(3)]
    sub = Subspace(params, max_rank=3)
    assert sub.add(vecs[:2]) == 2
    dependent = [a + 2 * b for a, b in zip(vecs[0], vecs[1])]
    assert sub.add(dependent) == 0
    B = torch.stack([oracle.flat64(v) for v in sub.basis])
    assert torch.allclose(B @ B.T, torch.eye(2, dtype=torch.float64), atol=1e-6)
    g = [torch.randn(5, 4, generator=gen), torch.randn(7, generator=gen)]
    expected = oracle.project(g, vecs[:2])
    atax_kernels.project_(g, sub)
    assert float((oracle.flat64(g) - oracle.flat64(expected)).norm()) <= 1e-5 * float(oracle.flat64(expected).norm() + 1)
    assert sub.add(vecs[2]) == 1
    with pytest.raises(ValueError, match="Subspace is full"):
        sub.add([[torch.randn(5, 4, generator=gen), torch.randn(7, generator=gen)]])
    newest = [torch.randn(5, 4, generator=gen), torch.randn(7, generator=gen)]
    assert sub.add(newest, evict="oldest") == 1 and sub.rank == 3
    twin = Subspace(params, max_rank=3)
    twin.load_state_dict(sub.state_dict())
    assert all(torch.equal(a, b) for va, vb in zip(sub.basis, twin.basis) for a, b in zip(va, vb))
    with pytest.raises(ValueError, match=r"vectors\[0\]\[1\] has shape"):
        sub.add([torch.zeros(5, 4), torch.zeros(8)])


def test_subspace_reference_in_optimizer_persists():
    model = _model()
    cap, saf = _losses(model)
    sub = Subspace(list(model.parameters()), max_rank=4)
    sub.add(_grads_of(model, cap))
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), subspace=sub)
    for _ in range(2):
        saf().backward()
        opt.step()
        assert bool(opt.last_stats.projected)
        opt.zero_grad()
    assert opt.num_references == 1
