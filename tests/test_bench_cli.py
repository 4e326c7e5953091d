"""Both benchmark CLIs end to end on tiny sizes (CI runs tests/ only; timing is never asserted here)."""
from __future__ import annotations

import json
import re

from atax_kernels.bench import core, optimizer


def test_projection_bench_cli(tmp_path, capsys):
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = core.main(["--scale", "0.002", "--dtype", "fp32,bf16", "--k", "1,2", "--repeat", "1", "--warmup", "1",
                    "--no-memory", "--no-progress", "--json", str(js), "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "stream floor" in out and "seed (torch.cat)" in out and "mismatch" not in out.lower()
    assert "git commit" in md.read_text()
    records = json.loads(js.read_text())["records"]
    impls = {r["impl"] for r in records}
    assert {"seed (torch.cat)", "stock foreach", "atax[torch]"} <= impls, impls
    assert all(r.get("ok") is not False for r in records), [r for r in records if r.get("ok") is False]


def test_optimizer_bench_cli(tmp_path, capsys):
    md = tmp_path / "opt.md"
    rc = optimizer.main(["--scale", "0.002", "--repeat", "2", "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == 0, out
    text = md.read_text()
    for row in ("plain AdamW step", "project_ alone", "wrapped AdamW step", "wrapped no-op step"):
        assert re.search(rf"\| {re.escape(row)} \| [0-9.]+ \| [0-9.]+ \|", text), row
    assert re.search(r"wrapper's own cost .* = [0-9.]+x the project_ time by medians", text)
    assert re.search(r"wrapped minus plain: -?[0-9.]+ MB", text)
