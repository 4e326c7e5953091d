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
    capability_label: str = "capability",
    safety_label: str = "safety",
) -> list[dict[str, Any]]:
    """Capability and safety of ``θ_base + α (θ_method − θ_base)`` for every method and alpha.

    Args:
        models: fine-tuned models by method name (left unchanged: each point is made on a copy).
        base_state: the base model's parameters by name (e.g. ``base.state_dict()``; may live on CPU).
        evaluate: returns at least ``{"capability": float, "safety": float}`` for a model.
        alphas: interpolation weights (0 = base, 1 = the fine-tuned model).
        plot: if given, write a PNG there (safety on x, capability on y, one line per method joined in
            alpha order, each point labelled with its alpha, the base model starred, axes fitted to the
            data); see :func:`plot_pareto`.
        capability_label, safety_label: axis labels: name the metric (e.g. ``"exact match (held-out)"``).

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
        base_xy = None
        if not any(float(a) == 0.0 for a in alphas):  # the base is not among the points: score it for the star
            point = copy.deepcopy(next(iter(models.values())))
            interpolate_(point, base_state, 0.0)
            scores = dict(evaluate(point))
            base_xy = (float(scores["safety"]), float(scores["capability"]))
            del point
        plot_pareto(rows, plot, series_key="method", x_label=safety_label, y_label=capability_label, base=base_xy)
    return rows


def _fit(values: list[float], margin: float = 0.08) -> tuple[float, float]:
    """Axis limits around the data with a relative margin (a fixed [0, 1] hides data outside it)."""
    lo, hi = min(values), max(values)
    span = hi - lo
    pad = margin * span if span > 0 else max(0.05 * abs(hi), 0.05)
    return lo - pad, hi + pad


def plot_pareto(
    rows: Sequence[Mapping[str, Any]],
    path: str,
    *,
    series_key: str = "method",
    x_key: str = "safety",
    y_key: str = "capability",
    x_label: str | None = None,
    y_label: str | None = None,
    base: tuple[float, float] | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Write a PNG: ``x_key`` (x) vs ``y_key`` (y), one line per ``series_key`` value.

    Each line joins its points in ``alpha`` order (the interpolation path, not a frontier sorted by
    score, which would draw a trade-off the models never made) and labels every point with its alpha.
    The axes fit the data with a margin. The base model is marked: the ``alpha = 0`` point, or ``base``
    ``(x, y)`` when given. Axis labels default to the metric names (``x_key``/``y_key``).

    Returns:
        What was drawn: ``{"series": {name: [(alpha, x, y), ...]}, "base": (x, y) or None, "xlim", "ylim",
        "xlabel", "ylabel"}`` (non-finite points are left out, with a warning).
    """
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float, float]]] = {}
    dropped = 0
    for order, r in enumerate(rows):
        x, y = float(r[x_key]), float(r[y_key])
        alpha = float(r["alpha"]) if "alpha" in r else float(order)
        if not (math.isfinite(x) and math.isfinite(y)):
            dropped += 1
            continue
        series.setdefault(str(r[series_key]), []).append((alpha, x, y))
    if dropped:
        warnings.warn(f"plot_pareto: {dropped} point(s) with a non-finite {x_key} or {y_key} left out of {path}",
                      UserWarning, stacklevel=2)
    for pts in series.values():
        pts.sort(key=lambda p: p[0])
    if base is None:
        at_zero = [(x, y) for pts in series.values() for a, x, y in pts if a == 0.0]
        base = at_zero[0] if at_zero else None
    xs = [p[1] for pts in series.values() for p in pts] + ([base[0]] if base else [])
    ys = [p[2] for pts in series.values() for p in pts] + ([base[1]] if base else [])
    xlabel, ylabel = x_label or x_key, y_label or y_key

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, pts in series.items():
        line, = ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=name)
        for a, x, y in pts:
            if base is not None and (x, y) == tuple(base):
                continue  # the star and its legend entry say it; every series shares this point
            ax.annotate(f"α={a:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=line.get_color())
    if base is not None:
        ax.plot([base[0]], [base[1]], marker="*", markersize=14, color="black", linestyle="none",
                label="base model (α=0)", zorder=5)
    xlim, ylim = (_fit(xs), _fit(ys)) if xs else ((0.0, 1.0), (0.0, 1.0))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{ylabel} vs {xlabel}\npoints: θ_base + α (θ_method − θ_base)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"series": series, "base": base, "xlim": xlim, "ylim": ylim, "xlabel": xlabel, "ylabel": ylabel}
