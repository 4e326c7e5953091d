"""The projection benchmark's output: one table per case (plain text for the terminal, markdown for reports)
and the markdown report with its environment header."""

from __future__ import annotations

import math

from .env import header_lines
from .impls import FLOOR

COLUMNS = ["impl", "median ms", "GB/s", "x floor", "vs seed", "peak extra MB", "% of grad", "check"]


def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _row(r: dict) -> list[str]:
    if r.get("error"):
        return [r["impl"], "error", "-", "-", "-", "-", "-", r["error"][:60]]
    if r["impl"] == FLOOR:
        lo, hi = r.get("floor_bandwidth_gbps_range", (float("nan"), float("nan")))
        check = (f"{r['probe']}, {r['floor_bandwidth_gbps']:.1f} GB/s "
                 f"(range {lo:.1f}-{hi:.1f} over {r.get('floor_probes', '?')} probes)")
    elif r["ok"] is None:
        check = "-"
    else:
        check = ("ok" if r["ok"] else "MISMATCH") + f" ({r['rel_err']:.1e})"
    mem_mb = r.get("peak_extra_mb")
    pct = r.get("peak_extra_pct_of_grad")
    if r.get("peak_extra_error"):
        mem_mb_s, pct_s = "err", "-"
    else:
        mem_mb_s, pct_s = _fmt(mem_mb, ".1f"), _fmt(pct, ".0f")
    return [
        r["impl"],
        _fmt(r["median_ms"], ".2f"),
        _fmt(r["gbps"], ".1f"),
        _fmt(r["x_floor"], ".2f"),
        _fmt(r["speedup_vs_seed"], ".2f") + ("x" if not math.isnan(r["speedup_vs_seed"]) else ""),
        mem_mb_s,
        pct_s,
        check,
    ]


def case_title(r: dict) -> str:
    """A case's heading: device, element and tensor counts, scale and minimum traffic."""
    return (
        f"{r['case']} on {r['device']}: N = {r['numel']:,} in {r['n_tensors']} tensors (scale {r['scale']:g}), "
        f"min traffic {r['min_traffic_bytes'] / 1e6:,.1f} MB"
    )


def format_tables(records: list[dict], markdown: bool = False) -> str:
    """One table per case (records grouped by ``case``, in order): aligned text, or markdown."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["case"], []).append(r)
    parts = []
    for _, rs in groups.items():
        rows = [_row(r) for r in rs]
        if markdown:
            lines = [f"### {case_title(rs[0])}", "", "| " + " | ".join(COLUMNS) + " |"]
            lines.append("|" + "|".join("---" if i in (0, 7) else "---:" for i in range(len(COLUMNS))) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            w = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
            fmt_line = lambda cells: "  ".join(  # noqa: E731
                c.ljust(w[i]) if i in (0, 7) else c.rjust(w[i]) for i, c in enumerate(cells)
            ).rstrip()
            lines = [case_title(rs[0]), fmt_line(COLUMNS), fmt_line(["-" * x for x in w])]
            lines += [fmt_line(row) for row in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def markdown_report(env: dict, records: list[dict], wall_s: float) -> str:
    """The markdown report: environment header, how to read the columns, the tables."""
    head = [
        "# atax_kernels projection benchmark",
        "",
        *header_lines(env, wall_s, with_atax_version=True),
        "",
        "Columns: median over the repeats (interleaved round-robin in one process); GB/s of the minimum traffic "
        "N·(3·s_g + 2k·s_r); x floor = time / (minimum traffic / stream bandwidth), the stream bandwidth being the "
        "median of a probe that moves the same bytes, run before every implementation in every round (its range "
        "is in the floor row); peak extra memory = peak "
        "RSS growth (CUDA: max_memory_allocated growth) of one projection in a fresh process, after grads and "
        "refs exist; check = relative L2 difference to the seed's result.",
        "",
        "",
    ]
    return "\n".join(head) + format_tables(records, markdown=True)

