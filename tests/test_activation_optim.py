"""ProjectedOptimizer(activation_subspace=...): the realised update (weight decay included) is projected,
reference_fn refreshes the bases, gradient references combine, stats and checkpoints carry the subspace."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from atax_kernels import ActivationSubspace, ProjectedOptimizer


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # linear in x (no first bias, no nonlinearity), so the second layer's inputs are low-rank too
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.Identity(), nn.Linear(16, 4)).double()


def low_rank_inputs(n: int = 30, rank: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, 8, generator=g,
                                                                                 dtype=torch.float64)


def observed(model: nn.Module, x: torch.Tensor, **kw) -> ActivationSubspace:
    sub = ActivationSubspace(model, basis_dtype=torch.float64, **kw)
    with torch.no_grad(), sub.observe():
        model(x)
    sub.update()
    return sub


def loss_on(model: nn.Module, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64)
    return (model(x) - 1.0).square().mean()


def test_removed_fraction_matches_oracle_and_weight_decay_is_projected():
    """A plain AdamW step (large weight decay) on a copy gives the unprojected update dW; the wrapper's
    update equals dW - dW U U^T for each weight (U from the oracle: the inputs' span), biases free, and
    last_stats reports |dW U U^T| / |dW| over the protected weights."""
    x = low_rank_inputs()
    model = mlp()
    plain = copy.deepcopy(model)
    sub = observed(model, x, energy=1.0, biases="free")
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5),
                             activation_subspace=sub, target="update")
    popt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.5)
    old = [p.detach().clone() for p in model.parameters()]
    for m, o in ((model, opt), (plain, popt)):
        o.zero_grad()
        loss_on(m).backward()
        o.step()
    with torch.no_grad():
        ins = {"0.weight": x, "2.weight": mlp()[0](x)}  # inputs of the two Linears before the step
    removed2 = total2 = 0.0
    for (name, p), q, o in zip(model.named_parameters(), plain.parameters(), old):
        dw = q.detach() - o
        if p.dim() == 1:
            assert torch.allclose(p, q, rtol=0, atol=1e-14)  # biases free: the plain update
            continue
        u = torch.linalg.svd(ins[name], full_matrices=False)[2]
        u = u[: torch.linalg.matrix_rank(ins[name])].t()
        want = dw - dw @ u @ u.t()
        assert (p.detach() - o - want).abs().max() <= 1e-12 * dw.abs().max()
        removed2 += float((dw @ u).square().sum())
        total2 += float(dw.square().sum())
    stats = opt.last_stats
    assert stats.reason is None
    assert float(stats.update_removed_fraction) == pytest.approx((removed2 / total2) ** 0.5, rel=1e-9)
    assert stats.feature_ranks == {"0": 3, "2": 3}
    assert stats.activation.feature_rank_mean == 3


def test_reference_fn_refreshes_and_no_capture_needed():
    """Loops that only call step(): reference_fn() runs inside observe() every refresh_every steps (no
    grad), update() follows; an activation-only step is not a step 'without references' (no warning)."""
    x = low_rank_inputs()
    model = mlp()
    sub = ActivationSubspace(model, energy=1.0, basis_dtype=torch.float64, biases="freeze")
    calls = []

    def ref():
        calls.append(torch.is_grad_enabled())
        return model(x)

    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), activation_subspace=sub,
                             target="update", reference_fn=ref, refresh_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(5):
            with torch.no_grad():
                before = model(x)
            opt.zero_grad()
            loss_on(model, seed=step).backward()
            opt.step()
            with torch.no_grad():
                assert (model(x) - before).abs().max() <= 1e-9 * before.abs().max()
            assert opt.last_stats.reason is None
    assert calls == [False, False, False] and sub.updates == 3


def test_combines_with_gradient_references():
    """A captured capability gradient (target='grad') plus the activation subspace: the gradient projection
    happens (removed_fraction > 0) and the activation guarantee still holds exactly."""
    x = low_rank_inputs()
    model = mlp()
    sub = observed(model, x, energy=1.0)
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), activation_subspace=sub, target="grad")
    with torch.no_grad():
        h = model[0](x)
    old = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    opt.zero_grad()
    loss_on(model, seed=7).backward()
    opt.capture_reference()
    loss_on(model, seed=8).backward()
    opt.step()
    assert float(opt.last_stats.removed_fraction) > 0
    assert float(opt.last_stats.update_removed_fraction) > 0
    for lin, o, inp in ((model[0], old[0], x), (model[2], old[1], h)):
        dw = lin.weight.detach() - o
        assert dw.norm() > 0
        assert ((dw @ inp.t()).norm(dim=0) <= 1e-9 * dw.norm() * inp.norm(dim=1)).all()


def test_float32_model_bound():
    """float32 weights and the default float32 basis: dW x stays below 1e-5 |dW| |x|."""
    torch.manual_seed(3)
    model = nn.Linear(32, 8, bias=False)
    x = low_rank_inputs(rank=4).float() @ torch.randn(8, 32)
    sub = ActivationSubspace(model, energy=1.0)
    with torch.no_grad(), sub.observe():
        model(x)
    sub.update()
    old = model.weight.detach().clone()
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), activation_subspace=sub)
    opt.zero_grad()
    model(torch.randn(10, 32)).square().sum().backward()
    opt.step()
    dw = model.weight.detach() - old
    assert dw.norm() > 0
    assert ((dw @ x.t()).norm(dim=0) <= 1e-5 * dw.norm() * x.norm(dim=1)).all()


def test_state_dict_carries_the_bases():
    x = low_rank_inputs()
    model = mlp()
    sub = observed(model, x, energy=0.9)
    opt = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), activation_subspace=sub)
    opt.zero_grad()
    loss_on(model).backward()
    opt.step()
    state = opt.state_dict()
    assert state["atax"]["activation"] is not None
    sub2 = ActivationSubspace(model, basis_dtype=torch.float64)
    opt2 = ProjectedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), activation_subspace=sub2)
    opt2.load_state_dict(state)
    assert sub2.ranks() == sub.ranks()
    for a, b in zip(sub._groups, sub2._groups):
        assert torch.equal(a.basis, b.basis)
