"""Both benchmark CLIs end to end on tiny sizes (CI runs tests/ only; timing is never asserted here)."""
from __future__ import annotations

import json
import re

from atax_kernels.bench import cli, optimizer, project


def test_projection_bench_cli(tmp_path, capsys):
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = cli.main(["--scale", "0.002", "--dtype", "fp32,bf16", "--k", "1,2", "--repeat", "1", "--warmup", "1",
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


# ------------------------------------------------------------------ one CLI: subcommands, list flags, help text
def _parsers():
    import argparse

    from atax_kernels import demo
    from atax_kernels.bench import remove_span

    captured = {}

    def grab(argv):  # optimizer builds its parser inside main(): capture it instead of running the benchmark
        orig = argparse.ArgumentParser.parse_args

        def spy(self, args=None, namespace=None):
            captured["optimizer"] = self
            raise SystemExit(0)

        argparse.ArgumentParser.parse_args = spy
        try:
            optimizer.main(argv)
        except SystemExit:
            pass
        finally:
            argparse.ArgumentParser.parse_args = orig

    grab([])
    return {"bench project": project.build_parser(), "bench remove-span": remove_span.build_parser(),
            "bench optimizer": captured["optimizer"], "demo": demo.build_parser()}


def test_bench_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("project", "remove-span", "optimizer"):
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), (name, out)


def test_bench_subcommands_dispatch(monkeypatch):
    from atax_kernels.bench import remove_span

    calls = []
    monkeypatch.setattr(optimizer, "main", lambda argv: calls.append(("optimizer", argv)) or 0)
    monkeypatch.setattr(remove_span, "main", lambda argv: calls.append(("remove-span", argv)) or 0)
    monkeypatch.setattr(project, "main", lambda argv: calls.append(("project", argv)) or 0)
    assert cli.main(["optimizer", "--repeat", "2"]) == 0
    assert cli.main(["remove-span", "--ranks", "4"]) == 0
    assert cli.main(["project", "--quick"]) == 0
    assert cli.main(["--markdown", "x.md"]) == 0      # no subcommand: project (the Makefile's `make bench`)
    assert calls == [("optimizer", ["--repeat", "2"]), ("remove-span", ["--ranks", "4"]),
                     ("project", ["--quick"]), ("project", ["--markdown", "x.md"])]


def test_unknown_bench_subcommand_is_an_error(capsys):
    import pytest

    with pytest.raises(SystemExit):
        cli.main(["projekt"])
    assert "unknown subcommand 'projekt'" in capsys.readouterr().err


def test_every_flag_has_help_and_lists_are_comma_separated():
    import argparse

    for where, parser in _parsers().items():
        for a in parser._actions:
            if a.help == argparse.SUPPRESS or isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help.strip(), (where, a.option_strings)
            # one list convention everywhere: comma-separated strings, never nargs or repeated flags
            assert a.nargs in (None, 0), (where, a.option_strings, a.nargs)
            assert not isinstance(a, argparse._AppendAction), (where, a.option_strings)
