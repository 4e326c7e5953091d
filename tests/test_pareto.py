"""pareto_sweep: interpolation rows per method and alpha, plot written, models untouched."""
from __future__ import annotations

import torch

from atax_kernels import pareto_sweep


def test_pareto_sweep_rows_and_plot(tmp_path):
    torch.manual_seed(0)
    base = torch.nn.Linear(3, 1)
    tuned = torch.nn.Linear(3, 1)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    before = [p.detach().clone() for p in tuned.parameters()]

    def evaluate(model):
        dist = sum(float((p - base_state[n]).norm()) for n, p in model.named_parameters())
        total = sum(float((b - base_state[n]).norm()) for (n, _), b in zip(tuned.named_parameters(), before))
        frac = dist / total
        return {"capability": 1 - frac, "safety": frac}

    path = tmp_path / "pareto.png"
    rows = pareto_sweep({"tuned": tuned}, base_state, evaluate, alphas=(0.0, 0.5, 1.0), plot=str(path))
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert [round(r["safety"], 6) for r in rows] == [0.0, 0.5, 1.0]
    assert path.stat().st_size > 1000
    assert all(torch.equal(a, b) for a, b in zip(before, tuned.parameters()))
