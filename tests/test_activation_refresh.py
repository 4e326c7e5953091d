"""Refreshing activation bases only when they move: ``ActivationSubspace.update_if_drifted`` (the decision against a
float64 oracle of the coverage, what is kept and what is dropped) and ``RefreshSchedule`` (intervals, bad input,
checkpoint round trip)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from atax_kernels.activation import ActivationSubspace, RefreshSchedule

SCALES = torch.tensor([4.0, 3, 2, 1, 0.5, 0.2, 0.1, 0.05], dtype=torch.float64)


def _built(x: torch.Tensor, **kw) -> tuple[nn.Module, ActivationSubspace]:
    model = nn.Linear(8, 2, bias=False).double()
    sub = ActivationSubspace(model, energy=0.9, weighting="energy", basis_dtype=torch.float64, **kw)
    with torch.no_grad(), sub.observe():
        model(x)
    sub.update()
    return model, sub


def _oracle_coverage(u: torch.Tensor, x: torch.Tensor) -> float:
    c = x.t() @ x
    return float(torch.trace(u.t() @ c @ u) / torch.trace(c))


@pytest.mark.parametrize("mix,expect_moved", [(0.0, False), (0.3, None), (1.0, True)])
def test_decision_follows_the_coverage_oracle(mix, expect_moved):
    """Kept iff the float64 coverage of the newly observed inputs is >= energy - tol; rebuilt otherwise, and then
    to exactly the basis update() gives on the same data."""
    torch.manual_seed(0)
    x = torch.randn(300, 8, dtype=torch.float64) * SCALES
    model, sub = _built(x)
    _, twin = _built(x)
    before = sub._groups[0].basis.clone()
    # inputs moving toward the small channels by `mix`
    x_new = (1 - mix) * x + mix * torch.randn(300, 8, dtype=torch.float64) * SCALES.flip(0)
    cov = _oracle_coverage(before, x_new)
    tol = 0.05
    for s in (sub, twin):
        with torch.no_grad(), s.observe():
            s.model(x_new)
    moved = sub.update_if_drifted(tol)
    built = _oracle_coverage(before, x)  # what the basis held of its own data (>= energy: no max_rank here)
    assert moved == (cov < min(0.9, built) - tol)
    if expect_moved is not None:
        assert moved is expect_moved
    assert sub.last_coverage[""] == pytest.approx(cov, rel=1e-9)
    twin.update()
    if moved:
        assert torch.equal(sub._groups[0].basis, twin._groups[0].basis)
        assert sub.updates == 2
    else:
        assert torch.equal(sub._groups[0].basis, before)
        assert sub.updates == 1
    # nothing observed is left over either way: the next update() sees only what comes after
    assert sub._groups[0].acc["capability"] is None and sub._groups[0].count["capability"] == 0.0


def test_same_inputs_keep_the_bases_and_other_inputs_rebuild_them():
    torch.manual_seed(1)
    x = torch.randn(200, 8, dtype=torch.float64) * SCALES
    model, sub = _built(x)
    with torch.no_grad(), sub.observe():
        model(x)
    assert sub.update_if_drifted(0.0) is False  # the same data: coverage is what the rank rule kept (>= energy)
    with torch.no_grad(), sub.observe():
        model(x.flip(1))
    assert sub.update_if_drifted(0.5) is True


def test_refusals_and_always_rebuilding_cases():
    torch.manual_seed(2)
    x = torch.randn(100, 8, dtype=torch.float64) * SCALES
    model, sub = _built(x)
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ValueError, match="tol"):
            sub.update_if_drifted(bad)
    _, con = _built(x, contrast=0.5)
    with pytest.raises(ValueError, match="contrast"):
        con.update_if_drifted(0.1)
    with torch.no_grad(), sub.observe():
        model(x)
    sub.update(decay=0.5)
    with torch.no_grad(), sub.observe():
        model(x)
    with pytest.raises(ValueError, match="decay"):
        sub.update_if_drifted(0.1)
    # refused before anything changed: the observed moments are still there for update()
    assert sub._groups[0].acc["capability"] is not None
    # never built: the first call builds
    fresh = ActivationSubspace(nn.Linear(8, 2, bias=False).double(), energy=0.9, basis_dtype=torch.float64)
    with torch.no_grad(), fresh.observe():
        fresh.model(x)
    assert fresh.update_if_drifted(0.5) is True and fresh.updates == 1


def test_embedding_tokens_follow_the_counts_while_dense_bases_are_kept():
    """Protected tokens cost no eigensolve: they are recomputed from what was observed even when the dense bases
    are kept (new tokens become protected at once)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2, bias=False)).double()
    sub = ActivationSubspace(model, energy=0.9)
    with torch.no_grad(), sub.observe():
        model(torch.tensor([[1, 2, 3, 1]]))
    sub.update()
    assert sub._entries[0].tokens.tolist() == [1, 2, 3]
    linear_basis = sub._groups[0].basis.clone()
    with torch.no_grad(), sub.observe():
        model(torch.tensor([[1, 2, 3, 7]]))
    assert sub.update_if_drifted(0.99) is False  # tol 0.99: the dense basis is kept whatever it sees
    assert torch.equal(sub._groups[0].basis, linear_basis)
    assert sub._entries[0].tokens.tolist() == [1, 2, 3, 7]


def test_schedule_fixed_matches_every_n():
    s = RefreshSchedule(every=10, tol=None)
    due = []
    for step in range(45):
        if s.due(step):
            due.append(step)
            s.record(step, moved=False)  # without tol a kept basis does not stretch the interval
    assert due == [10, 20, 30, 40]
    assert (s.checks, s.refreshes) == (4, 0)


def test_schedule_doubles_while_still_and_resets_when_moved():
    s = RefreshSchedule(every=5, tol=0.02, max_every=20)
    seen = []
    moved_at = {35}
    for step in range(80):
        if s.due(step):
            seen.append(step)
            s.record(step, moved=step in moved_at)
    # kept at 5 and 15 (interval 10, then 20 = the cap), moved at 35 (back to 5), kept at 40 and 50
    assert seen == [5, 15, 35, 40, 50, 70]
    assert s.history[2] == (35, True) and s.refreshes == 1 and s.checks == 6


def test_schedule_bad_input_and_round_trip():
    for kw in ({"every": 0}, {"every": 2.0}, {"every": True}, {"tol": 1.0}, {"tol": -0.1}, {"tol": "x"},
               {"every": 10, "max_every": 5}):
        with pytest.raises(ValueError):
            RefreshSchedule(**kw)
    s = RefreshSchedule(every=3, tol=0.1)
    for step in range(20):
        if s.due(step):
            s.record(step, moved=False)
    t = RefreshSchedule(every=1, tol=None)
    t.load_state_dict(s.state_dict())
    assert t == s and t.state_dict() == s.state_dict()
    assert [t.due(k) for k in range(20, 60)] == [s.due(k) for k in range(20, 60)]
    with pytest.raises(ValueError, match="missing"):
        t.load_state_dict({"every": 3})


def test_refresh_with_tol_from_the_kept_loader():
    """Same loader, same model: kept. The first layer rotated (the second layer's input moves): rebuilt."""
    torch.manual_seed(4)
    x = torch.randn(64, 8, dtype=torch.float64) * SCALES
    first, second = nn.Linear(8, 8, bias=False).double(), nn.Linear(8, 2, bias=False).double()
    with torch.no_grad():
        first.weight.copy_(torch.eye(8, dtype=torch.float64))
    model = nn.Sequential(first, second)
    sub = ActivationSubspace.from_loader(model, [x[:32], x[32:]], energy=0.9, basis_dtype=torch.float64)
    before = [g.basis.clone() for g in sub._groups]
    assert sub.refresh(tol=0.02) is False
    assert all(torch.equal(g.basis, b) for g, b in zip(sub._groups, before))
    with torch.no_grad():
        first.weight.copy_(torch.eye(8, dtype=torch.float64).flip(1))  # the large channels now land on the small
    assert sub.refresh(tol=0.02) is True and sub.updates == 2
    assert not torch.equal(sub._groups[1].basis, before[1])
    assert sub.refresh() is True and sub.updates == 3
    with pytest.raises(ValueError, match="exclude"):
        sub.refresh(0.5, tol=0.02)


def test_bad_refresh_is_refused_before_observing():
    torch.manual_seed(5)
    x = torch.randn(32, 8, dtype=torch.float64) * SCALES
    model = nn.Linear(8, 2, bias=False).double()
    seen = []
    sub = ActivationSubspace.from_loader(model, [x], energy=0.9, contrast=0.5,
                                         forward=lambda m, b: seen.append(1) or m(b))
    seen.clear()
    with pytest.raises(ValueError, match="contrast"):
        sub.refresh(tol=0.02)
    with pytest.raises(ValueError, match="tol"):
        sub.refresh(tol=2.0)
    assert not seen and sub._groups[0].acc["capability"] is None


def test_a_capped_basis_is_judged_against_what_it_held():
    """max_rank caps the basis below energy: on its own data it still counts as not moved."""
    torch.manual_seed(6)
    x = torch.randn(200, 8, dtype=torch.float64) * SCALES
    model, sub = _built(x, max_rank=1)
    assert _oracle_coverage(sub._groups[0].basis, x) < 0.9 - 0.05
    with torch.no_grad(), sub.observe():
        model(x)
    assert sub.update_if_drifted(0.05) is False


def test_lora_both_always_rebuilds_and_lora_input_is_judged():
    peft = pytest.importorskip("peft")
    torch.manual_seed(7)
    x = torch.randn(64, 8, dtype=torch.float64) * SCALES

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8, bias=False)

        def forward(self, t):
            return self.proj(t)

    for rule, expect in (("both", True), ("input", False)):
        model = peft.get_peft_model(Net().double(), peft.LoraConfig(r=2, target_modules=["proj"]))
        sub = ActivationSubspace(model, energy=0.9, lora=rule)
        for _ in range(2):
            with torch.no_grad(), sub.observe():
                model(x)
            moved = sub.update_if_drifted(0.05) if sub.updates else (sub.update() or True)
        assert moved is expect, rule
