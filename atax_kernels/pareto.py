"""Safety–capability Pareto frontiers: sweep weight interpolation over fine-tuned models and plot."""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping, Sequence

import torch

from .interpolate import interpolate_


def pareto_sweep(
    models: Mapping[str, torch.nn.Module],
    base_state: Mapping[str, torch.Tensor],
    evaluate: Callable[[torch.nn.Module], Mapping[str, float]],
    *,
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    plot: str | None = None,
) -> list[dict[str, Any]]:
    """Capability and safety of ``θ_base + α (θ_method − θ_base)`` for every method and alpha.

    Args:
        models: fine-tuned models by method name (left unchanged: each point is made on a copy).
        base_state: the base model's parameters by name (e.g. ``base.state_dict()``; may live on CPU).
        evaluate: returns at least ``{"capability": float, "safety": float}`` for a model.
        alphas: interpolation weights (0 = base, 1 = the fine-tuned model).
        plot: if given, write a Pareto PNG there (safety on x, capability on y, one line per method).

    Returns:
        Rows ``{"method", "alpha", "capability", "safety", ...}`` (every key ``evaluate`` returned).
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty mapping from method name to model")
    for a in alphas:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ValueError(f"alphas must be finite numbers, got {a!r}")
    rows: list[dict[str, Any]] = []
    for name, model in models.items():
        for alpha in alphas:
            point = copy.deepcopy(model)
            interpolate_(point, base_state, float(alpha))
            scores = dict(evaluate(point))
            for key in ("capability", "safety"):
                if key not in scores:
                    raise ValueError(f"evaluate() must return {key!r}; got keys {sorted(scores)}")
            rows.append({"method": name, "alpha": float(alpha), **scores})
            del point
    if plot:
        plot_pareto(rows, plot, series_key="method")
    return rows


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: str, *, series_key: str = "method",
                title: str = "Alignment tax: safety vs capability kept") -> None:
    """Write a PNG: safety (x) vs capability (y), one line per ``series_key`` value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        series.setdefault(str(r[series_key]), []).append((float(r["safety"]), float(r["capability"])))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("safety")
    ax.set_ylabel("capability kept")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
