"""The end-to-end demo in its CI size: both tasks, every quick method present, held-out and train-split scores
in range, deterministic in and out of worker processes, and the report/plot written."""
from __future__ import annotations

import json

import pytest

from atax_kernels import demo, tasks


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("atax_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("ATAX_CACHE_DIR", str(cache))
    try:
        # pretrains and caches the bases; trains in this process
        first = demo.run(quick=True, progress=False, log=lambda *_: None, jobs=1)
        # loads the cached bases; trains in 2 worker processes (rows must not depend on that)
        second = demo.run(quick=True, progress=False, log=lambda *_: None, jobs=2)
    finally:
        mp.undo()
    return first, second


def test_every_method_on_every_task_with_held_out_and_train_scores(quick_runs, tmp_path):
    rows, _ = quick_runs
    expected = {m.name for m in demo.methods(quick=True)} - {"interp"} | {f"interp {a}" for a in demo.INTERP_ALPHAS}
    for task in tasks.TASKS:
        names = {r["method"] for r in rows if r["task"] == task}
        assert names == expected, (task, names ^ expected)
    for r in rows:
        for key in ("capability", "capability_train", "safety", "safety_train", "over_refusal", "ece"):
            assert 0.0 <= r[key] <= 1.0, (r["method"], key, r[key])
        assert r["tax_ci"][0] <= r["tax"] <= r["tax_ci"][1]
        assert r["extra_forward"] >= 0 and r["extra_backward"] >= 0
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    assert len(json.loads(path.read_text())) == len(rows)


def test_two_runs_give_identical_numbers_in_and_out_of_worker_processes(quick_runs):
    first, second = quick_runs
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(first) == strip(second)


def test_matched_compute_columns(quick_runs):
    rows, _ = quick_runs
    cost = {r["method"]: (r["extra_forward"], r["extra_backward"]) for r in rows}
    assert cost["plain"] == (0.0, 0.0)
    assert cost["ptx 1.0"] == (1.0, 1.0)
    assert cost["grad: loss ref"] == (1.0, 1.0)
    fwd, bwd = cost["act e0.99 c0"]
    assert 0 < fwd < 1 and bwd == 0.0  # a no-grad capability forward every 10 steps, no extra backward


def test_ptx_keeps_more_held_out_capability_than_plain(quick_runs):
    rows, _ = quick_runs
    at = {(r["task"], r["method"], r["lr"]): r for r in rows}
    # Measured (quick, seed 0): modular plain 0.00-0.01 / ptx 1.0 0.96 at held-out safety 1.0.
    for lr in demo.QUICK_LRS:
        plain, ptx = at[("modular", "plain", lr)], at[("modular", "ptx 1.0", lr)]
        assert plain["safety"] >= 0.95 and plain["capability"] <= 0.1, plain
        assert ptx["capability"] >= plain["capability"] + 0.5, (ptx, plain)


def test_report_and_plot(quick_runs, tmp_path):
    rows, _ = quick_runs
    text = demo.markdown_report(rows, demo.run_info(["--quick"], 1.0))
    for needle in ("machine:", "git commit:", "held-out", "### task `modular`", "### task `overflow`", "Columns:",
                   "`python -m atax_kernels.demo --quick`"):
        assert needle in text
    # saved rows re-render to the same tables, with the original run's header
    saved = tmp_path / "rows.json"
    saved.write_text(json.dumps({"run": demo.run_info(["--quick"], 12.0), "rows": rows}))
    md = tmp_path / "again.md"
    assert demo.main(["--from-json", str(saved), "--markdown", str(md)]) == 0
    again = md.read_text()
    assert demo.format_table(rows) in again and "in 12 s" in again and "re-rendered by" in again
    png = tmp_path / "demo.png"
    demo.plot(rows, str(png))
    assert png.stat().st_size > 10_000


def test_aggregate_mean_and_std_over_seeds():
    rows = [dict(task="t", method="m", lr=1e-3, family="f", dial=None, seed=s, extra_forward=0.0, extra_backward=0.0,
                 capability=c, capability_train=1.0, safety=1.0, safety_train=1.0, over_refusal=0.0, tax=0.0,
                 ece=0.0, entropy=0.0, seconds=1.0) for s, c in ((0, 0.2), (1, 0.4), (2, 0.6))]
    (agg,) = demo.aggregate(rows)
    assert agg["n_seeds"] == 3
    assert agg["capability"] == pytest.approx(0.4)
    assert agg["capability_std"] == pytest.approx(0.2)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        demo.run(quick=True, progress=False, log=lambda *_: None, jobs=0)
    with pytest.raises(ValueError, match="unknown task"):
        demo.run(quick=True, progress=False, log=lambda *_: None, task_names=["nope"])
    with pytest.raises(SystemExit):
        demo.main(["--quick", "--full"])


def test_help_time_estimates_match_the_recorded_runs_and_the_readme():
    """`--help` states the wall times that docs/demo.md and docs/demo-full.md recorded, as the README does."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = demo.build_parser().format_help()
    flat = " ".join(text.split())
    readme = " ".join((root / "README.md").read_text().split())
    for doc in ("demo.md", "demo-full.md"):
        seconds = re.search(r"in (\d+) s; steps", (root / "docs" / doc).read_text()).group(1)
        assert f"{seconds} s measured" in flat, (doc, seconds, flat)
        assert f"{seconds} s on the 2-core EPYC" in readme, (doc, seconds)
    assert "~3 min" in flat and "~3 min on 2 cores" in readme


def test_list_flags_are_comma_separated_and_the_old_task_flag_still_works(monkeypatch):
    seen = {}
    from atax_kernels.demo import cli as demo_cli

    monkeypatch.setattr(demo_cli, "run", lambda **kw: seen.update(kw) or [])
    monkeypatch.setattr(demo_cli, "run_info", lambda argv, wall: {"wall_s": wall})
    demo.main(["--seeds", "0,1,2", "--tasks", "overflow", "--no-progress"])
    assert seen["seeds"] == [0, 1, 2] and seen["task_names"] == ["overflow"]
    demo.main(["--task", "modular", "--no-progress"])
    assert seen["task_names"] == ["modular"]
    with pytest.raises(SystemExit):
        demo.main(["--tasks", "nope"])


def _fake_rows(seeds=(0,)):
    rows = []
    for task in ("modular", "overflow"):
        for m in demo.methods(full=True):
            names = [f"interp {a}" for a in demo.INTERP_ALPHAS] if m.name == "interp" else [m.name]
            for i, name in enumerate(names):
                for lr in demo.DEFAULT_LRS:
                    for s in seeds:
                        cap = 0.95 if name.startswith("act e0.99") else 0.5 + 0.01 * i
                        rows.append(dict(task=task, method=name, family=m.family if m.name != "interp" else "interp",
                                         dial=demo.INTERP_ALPHAS[i] if m.name == "interp" else m.dial, lr=lr, seed=s,
                                         extra_forward=0.0, extra_backward=0.0, capability=cap, capability_train=1.0,
                                         safety=0.09 if name == "act e0.99 c0" else 0.97, safety_train=1.0,
                                         over_refusal=0.0, tax=0.0, ece=0.0, entropy=0.0, seconds=1.0))
    return rows


def test_figure_colours_labels_title_and_unsafe_points():
    import matplotlib.colors as mc

    # one colour family per kind of method, the same colour for a method in every figure
    assert demo.method_style("ptx 1.0") == demo.method_style("ptx 1.0")
    assert demo.method_style("act e0.99 c1")["color"] == demo.method_style("act e0.99 c0")["color"]
    assert demo.method_style("act e0.99 c1")["linestyle"] == "--"
    hue = lambda m: mc.rgb_to_hsv(mc.to_rgb(demo.method_style(m)["color"]))[0]  # noqa: E731
    assert abs(hue("grad: loss ref") - hue("grad: conflict")) < 0.1
    assert abs(hue("ptx 0.1") - hue("act e0.9 c0")) > 0.2
    for name in demo.RECOMMENDED:
        assert demo.method_style(name)["linewidth"] > 2 * demo.method_style("plain")["linewidth"]
    assert demo.seeds_note(1) == "1 seed" and demo.seeds_note(3) == "3 seeds; error bars: std"

    for seeds in ((0,), (0, 1, 2)):
        fig = demo.figure(_fake_rows(seeds))
        try:
            assert fig._suptitle.get_text().endswith(f"({demo.seeds_note(len(seeds))})")
            renderer = fig.canvas.get_renderer()
            for ax in fig.axes:   # no two labels overlap
                boxes = [t.get_window_extent(renderer) for t in ax.texts if t.get_visible() and t.get_text()]
                for i, a in enumerate(boxes):
                    assert not any(a.overlaps(b) for b in boxes[i + 1:]), ax.get_title()
            # the unsafe high-capability point (safety 0.09) has its safety printed beside it
            assert any("safety 0.09" in t.get_text() for t in fig.axes[0].texts)
            colours = {lab: h.lines[0].get_color() if hasattr(h, "lines") else h.get_color()
                       for h, lab in zip(*fig.axes[0].get_legend_handles_labels())}
            assert colours["ptx 1.0"] == demo.method_style("ptx 1.0")["color"]
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)
