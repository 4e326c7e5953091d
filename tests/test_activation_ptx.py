"""Activation projection + PTX: the safety part is projected, the PTX part passes (activation_target='grad')."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from atax_kernels import ActivationSubspace, ProjectedOptimizer


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False)).double()
    basis_in = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))[0]
    cap_x = torch.randn(20, 3, dtype=torch.float64) @ basis_in.t()  # capability inputs span 3 of 8 dims
    sub = ActivationSubspace(model, energy=1.0, basis_dtype=torch.float64, norms="free", biases="free")
    with torch.no_grad(), sub.observe():
        model(cap_x)
    sub.update()
    return model, sub, cap_x


def grads_of(model, loss_fn):
    model.zero_grad()
    loss_fn().backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def test_grad_target_projects_safety_and_lets_ptx_through():
    """SGD (no momentum): the step is exactly -lr (P(g_safety) + lambda * g_ptx), with P(G) = G - G U U^T per
    layer, so the PTX update keeps its component on the protected span and the safety update has none."""
    model, sub, cap_x = setup()
    safe_x = torch.randn(10, 8, dtype=torch.float64)
    ptx = lambda: model(cap_x).pow(2).mean()  # noqa: E731
    safety = lambda: (model(safe_x) - 1).pow(2).mean()  # noqa: E731
    g_ptx, g_safe = grads_of(model, ptx), grads_of(model, safety)
    bases = [sub._groups[0].basis, sub._groups[1].basis]
    proj = [g - g @ u @ u.t() for g, u in zip(g_safe, bases)]
    lr, lam = 0.1, 0.5
    expected = [p.detach() - lr * (q + lam * c) for p, q, c in zip(model.parameters(), proj, g_ptx)]

    old = [p.detach().clone() for p in model.parameters()]
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=lr), activation_subspace=sub, ptx_weight=lam)
    assert opt.activation_target == "grad"
    opt.zero_grad()
    ptx().backward()
    opt.capture_reference()
    safety().backward()
    opt.step()
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.detach(), e, rtol=0, atol=1e-12 * e.norm())
    assert float(opt.last_stats.activation.update_removed_fraction) > 0
    # the PTX part did reach the protected span (an update projection would have removed it)
    update = expected[0] - old[0]
    assert (update @ bases[0]).norm() > 1e-3 * update.norm()


def test_grad_target_without_ptx_keeps_capability_outputs_of_sgd():
    model, sub, cap_x = setup(1)
    first = model[0].weight.detach().clone()
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), activation_subspace=sub,
                             activation_target="grad")
    opt.zero_grad()
    (model(torch.randn(10, 8, dtype=torch.float64)) - 1).pow(2).mean().backward()
    opt.step()
    dw = model[0].weight.detach() - first
    assert dw.norm() > 1e-4
    assert (dw @ cap_x.t()).norm() <= 1e-10 * dw.norm() * cap_x.norm()


def test_ptx_with_update_target_is_refused():
    model, sub, _ = setup()
    with pytest.raises(ValueError, match="project the PTX part of the update away"):
        ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), activation_subspace=sub, ptx_weight=1.0,
                           activation_target="update")
    with pytest.raises(ValueError, match="activation_target"):
        ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), activation_subspace=sub,
                           activation_target="weights")


def test_grad_target_refuses_a_closure():
    model, sub, _ = setup()
    opt = ProjectedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), activation_subspace=sub,
                             activation_target="grad")
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)


def test_coverage_says_whether_the_bases_moved():
    """coverage() = tr(U^T C U)/tr(C) of what was observed since update(): the energy on the same inputs
    (raw weighting: exactly what the rank rule kept), lower on inputs that left the span."""
    torch.manual_seed(3)
    model = nn.Linear(8, 2, bias=False).double()
    scales = torch.tensor([4.0, 3, 2, 1, 0.5, 0.2, 0.1, 0.05], dtype=torch.float64)
    x = torch.randn(200, 8, dtype=torch.float64) * scales
    sub = ActivationSubspace(model, energy=0.9, weighting="energy", basis_dtype=torch.float64)
    with torch.no_grad(), sub.observe():
        model(x)
    sub.update()
    w = torch.linalg.eigvalsh(x.t() @ x).flip(0)
    k = sub.ranks()[""]  # the model is the one protected module
    with torch.no_grad(), sub.observe():
        model(x)
    assert sub.coverage()[""] == pytest.approx(float(w[:k].sum() / w.sum()), rel=1e-9)
    assert sub.coverage()[""] >= 0.9
    sub.update()
    with torch.no_grad(), sub.observe():
        model(x.flip(1))  # the small channels now carry the energy
    assert sub.coverage()[""] < 0.2


def test_loader_positions_answer_prompt_all():
    """positions='answer' observes only labelled positions, 'prompt' the rest, 'all' every unpadded one: the
    counts add up, and refresh() keeps the choice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 4))
    ids = torch.randint(0, 10, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 2, 3, -100, -100]])
    batches = [{"input": ids, "attention_mask": mask, "labels": labels}]
    fwd = lambda m, b: m(b["input"])  # noqa: E731
    count = {}
    for pos in ("all", "answer", "prompt"):
        sub = ActivationSubspace(model, energy=0.9, modules=["1"])
        sub.observe_loader(batches, forward=fwd, positions=pos)
        count[pos] = sub._groups[0].count["capability"]
    assert count == {"all": 8.0, "answer": 5.0, "prompt": 3.0}
    sub = ActivationSubspace.from_loader(model, batches, forward=fwd, positions="answer", modules=["1"])
    sub.observe_loader(batches, forward=fwd)
    assert sub._groups[0].count["capability"] == 5.0
    with pytest.raises(ValueError, match=r"positions='answer' needs dict batches with 'labels'.*batch 0.*\['attention_mask', 'input'\]"):
        ActivationSubspace(model, modules=["1"]).observe_loader([{"input": ids, "attention_mask": mask}],
                                                               forward=fwd, positions="answer")
    with pytest.raises(ValueError, match="positions must be one of"):
        ActivationSubspace(model, modules=["1"]).observe_loader(batches, forward=fwd, positions="labels")
