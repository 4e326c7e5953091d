"""The demo's figure: per task, held-out capability and safety against the learning rate, and what each dial
trades; one fixed colour, marker and line per method in every figure."""
from __future__ import annotations

import math
from typing import Any

from .methods import INTERP_ALPHAS, methods
from .report import aggregate


#: Colour families: one hue per kind of method, shades within it (the recommended settings the strongest shade);
#: the same method has the same colour, marker and line in every figure: the table is fixed, not built from the
#: rows a figure happens to hold. Contrast (c1) runs take their c0 twin's colour, dashed.
FAMILY_COLOURS = {
    "plain": {"plain": "#000000"},
    "ptx": {"ptx 0.1": "#6baed6", "ptx 1.0": "#08519c"},
    "kl": {"kl 0.5": "#8c564b"},
    "interp": {"interp 0.25": "#bcbddc", "interp 0.5": "#807dba", "interp 0.75": "#54278f"},
    "grad": {"grad: loss ref": "#a1d99b", "grad: 4 tempered (update)": "#41ab5d", "grad: conflict": "#006d2c",
             "grad: tempered + ptx 0.1": "#00441b"},
    "act": {"act e0.9 c0": "#fc9272", "act e0.99 c0": "#cb181d"},
    "act + ptx": {"act e0.99 c0 + ptx 1.0": "#fdae6b", "act e0.9 c0 + ptx 1.0": "#d94801"},
}
_FAMILY_MARKERS = "osD^vP"
#: What the README recommends, drawn thick and named in the legend.
RECOMMENDED = {"act e0.99 c0": "recommended default", "act e0.9 c0 + ptx 1.0": "recommended + PTX (semantic trigger)"}
#: Below this held-out safety a point is drawn hollow and its safety printed beside it: not a win.
LOW_SAFETY = 0.8


def colour_family(method: str) -> str:
    """The colour family of a row's method name (``plain``, ``ptx``, ``kl``, ``interp``, ``grad``, ``act``,
    ``act + ptx``)."""
    if method == "plain":
        return "plain"
    if method.startswith("act "):
        return "act + ptx" if "+ ptx" in method else "act"
    for fam in ("ptx", "kl", "interp", "grad"):
        if method.startswith(fam):
            return fam
    return "other"


def _known_methods() -> list[str]:
    names = [m.name for m in methods(full=True) if m.name != "interp"]
    return names[:4] + [f"interp {a}" for a in INTERP_ALPHAS] + names[4:]


def method_style(method: str) -> dict[str, Any]:
    """Colour, marker, line style and width of a method, the same in every figure. Contrast (c1) runs are
    dashed; the recommended settings are thick."""
    fam = colour_family(method)
    shades = FAMILY_COLOURS.get(fam, {})
    base = method.replace(" c1", " c0")
    i = list(shades).index(base) if base in shades else 0
    colour = shades.get(base, next(iter(shades.values()), "#7f7f7f"))
    return dict(color=colour, marker=_FAMILY_MARKERS[i % len(_FAMILY_MARKERS)],
                linestyle="--" if " c1" in method else "-", linewidth=3.2 if method in RECOMMENDED else 1.3,
                markersize=8 if method in RECOMMENDED else 5.5, zorder=4 if method in RECOMMENDED else 2)


def seeds_note(n: int) -> str:
    """``1 seed`` or ``3 seeds; error bars: std``."""
    return "1 seed" if n == 1 else f"{n} seeds; error bars: std"


def _place_labels(fig, ax, items: list[tuple[float, float, str, str]], fontsize: float = 7.0) -> None:
    """Annotate (x, y, text, colour) in data coordinates without overlaps: each label takes the first of a ring
    of offsets whose box overlaps no label placed before it and stays inside the axes; one that finds none is
    dropped (the value is in the tables)."""
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    placed = [t.get_window_extent(renderer) for ax2 in fig.axes for t in ax2.texts if t.get_visible()]
    offsets = [(5, 4), (5, -10), (-5, 4), (-5, -10), (8, 12), (8, -18), (-8, 12), (-8, -18), (14, -3),
               (-14, -3), (5, 20), (5, -26), (-5, 20), (-5, -26), (20, 10), (20, -16), (-20, 10), (-20, -16)]
    for x, y, text, colour in items:
        for dx, dy in offsets:
            t = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                            color=colour, ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top",
                            zorder=6, bbox=dict(boxstyle="square,pad=0.05", fc="white", ec="none", alpha=0.7))
            box = t.get_window_extent(renderer)
            if box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0 and box.y1 <= inside.y1 \
                    and not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            t.remove()


def figure(rows: list[dict[str, Any]]):
    """The demo's figure (a matplotlib Figure; :func:`plot` saves it). Per task: held-out capability kept vs
    learning rate, held-out safety vs learning rate (a line per method: one colour family per kind of method,
    the recommended settings thick), and held-out capability vs held-out safety at the middle learning rate for
    the families with a dial (interpolation α, PTX weight λ, activation energy E), labelled by the dial. In the
    capability panel a point whose held-out safety is below ``LOW_SAFETY`` is hollow with its safety printed:
    high capability there is not a win."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    agg = aggregate(rows)
    task_names = list(dict.fromkeys(r["task"] for r in agg))
    fig, axes = plt.subplots(len(task_names), 3, figsize=(20, 6.0 * len(task_names)), squeeze=False)
    order = {m: i for i, m in enumerate(_known_methods())}
    method_names = sorted(dict.fromkeys(r["method"] for r in agg if not r["method"].startswith("interp ")
                                        or r["method"] == "interp 0.5"), key=lambda m: order.get(m, len(order)))
    pending: list[tuple[Any, list]] = []
    for ti, task in enumerate(task_names):
        ax_cap, ax_saf, ax_trade = axes[ti]
        low: list[tuple[float, float, str, str]] = []
        for method in method_names:
            pts = sorted((r["lr"], r) for r in agg if r["task"] == task and r["method"] == method)
            if not pts:
                continue
            st = method_style(method)
            label = method + (f"  ★ {RECOMMENDED[method]}" if method in RECOMMENDED else "")
            xs = [lr for lr, _ in pts]
            for ax, key in ((ax_cap, "capability"), (ax_saf, "safety")):
                ax.errorbar(xs, [r[key] for _, r in pts], yerr=[r[key + "_std"] for _, r in pts], capsize=3,
                            label=label, **st)
            for lr, r in pts:  # unsafe points: hollow, safety printed beside them
                if r["safety"] < LOW_SAFETY:
                    ax_cap.plot([lr], [r["capability"]], marker=st["marker"], markersize=st["markersize"] + 3,
                                markerfacecolor="white", markeredgecolor=st["color"], markeredgewidth=1.6,
                                linestyle="none", zorder=st["zorder"] + 1)
                    if r["capability"] >= 0.2:
                        low.append((lr, r["capability"], f"safety {r['safety']:.2f}", st["color"]))
        pending.append((ax_cap, low))
        for ax, what in ((ax_cap, "capability kept"), (ax_saf, "safety (refusal rate)")):
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel(f"held-out {what}")
            ax.set_ylim(-0.03, 1.05)
            ax.grid(alpha=0.3)
        ax_cap.set_title(f"{task}: held-out capability kept vs learning rate\n(hollow: held-out safety < "
                         f"{LOW_SAFETY:g}, its value printed — not a win)", fontsize=10)
        ax_saf.set_title(f"{task}: held-out safety (refusal rate) vs learning rate", fontsize=10)
        lrs = sorted({r["lr"] for r in agg if r["task"] == task})
        mid = lrs[len(lrs) // 2]
        families: dict[str, list[dict[str, Any]]] = {}
        for r in agg:
            if r["task"] == task and r["lr"] == mid and r["dial"] is not None and r["family"] not in ("kl",):
                families.setdefault(r["family"], []).append(r)
        trade_labels: list[tuple[float, float, str, str]] = []
        for fam, rs in families.items():
            rs = sorted(rs, key=lambda r: r["dial"])
            if fam == "interp":
                plain = next((r for r in agg if r["task"] == task and r["lr"] == mid and r["method"] == "plain"), None)
                rs = rs + ([plain] if plain else [])
            # the family's colour: its strongest shade's
            member = next((r["method"] for r in rs if r["method"] != "plain"), rs[-1]["method"])
            st = method_style(next(reversed(FAMILY_COLOURS.get(colour_family(member), {"": 0}))))
            st["linestyle"] = "--" if " c1" in rs[-1]["method"] else "-"
            xs, ys = [r["safety"] for r in rs], [r["capability"] for r in rs]
            ax_trade.errorbar(xs, ys, xerr=[r["safety_std"] for r in rs], yerr=[r["capability_std"] for r in rs],
                              color=st["color"], marker=st["marker"], linestyle=st["linestyle"], capsize=3,
                              label={"ptx": "plain → ptx λ"}.get(fam, fam), linewidth=1.5, markersize=6)
            for r, x, y in zip(rs, xs, ys):
                if r["method"] in RECOMMENDED:
                    ax_trade.plot([x], [y], marker="*", markersize=16, color=st["color"], markeredgecolor="black",
                                  linestyle="none", zorder=5)
                dial = 1.0 if (fam == "interp" and r["method"] == "plain") else r["dial"]
                name = {"interp": "α", "ptx": "λ"}.get(fam, "E")
                trade_labels.append((x, y, f"{name}={dial:g}", st["color"]))
        ax_trade.scatter([0.0], [1.0], marker="P", s=120, color="black", label="base model (α=0)", zorder=5)
        ax_trade.add_patch(matplotlib.patches.Rectangle((-0.05, -0.05), LOW_SAFETY + 0.05, 1.13, color="#d62728",
                                                        alpha=0.06, zorder=0))
        ax_trade.text(0.0, -0.03, f"safety < {LOW_SAFETY:g}: not a win", fontsize=8, color="#d62728", va="bottom")
        ax_trade.set_xlabel("held-out safety")
        ax_trade.set_ylabel("held-out capability kept")
        ax_trade.set_xlim(-0.05, 1.1)
        ax_trade.set_ylim(-0.05, 1.1)
        ax_trade.grid(alpha=0.3)
        handles, labels = ax_trade.get_legend_handles_labels()
        handles.append(Line2D([], [], marker="*", markersize=12, color="grey", markeredgecolor="black",
                              linestyle="none"))
        labels.append("recommended setting")
        ax_trade.legend(handles, labels, fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 0.06))
        ax_trade.set_title(f"{task}: what each dial trades (lr {mid:g}); top right is the goal", fontsize=10)
        pending.append((ax_trade, trade_labels))
    seeds = sorted({r["seed"] for r in rows})
    fig.suptitle(f"Alignment tax on two tiny tasks, held-out scores ({seeds_note(len(seeds))})")
    # one legend for the learning-rate panels of every task (same colours, markers and lines), outside the axes
    handles, labels = [], []
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    ncol = 5
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.035 * math.ceil(len(labels) / ncol) / len(task_names), 1, 0.97))
    for ax, items in pending:  # after the layout: label placement works in display coordinates
        _place_labels(fig, ax, items)
    return fig


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Write :func:`figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(rows)
    fig.savefig(path, dpi=110)
    plt.close(fig)
