"""Every script in examples/ runs as a newcomer would run it (a subprocess, CPU, a few steps) and trains."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=EXAMPLES.parent)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def loss_first_last(out: str) -> tuple[float, float]:
    m = re.search(r"^training loss ([0-9.]+) -> ([0-9.]+)$", out, re.M)
    assert m, out[-4000:]
    return float(m.group(1)), float(m.group(2))


@pytest.mark.parametrize("name", ["activation_full.py", "activation_lora.py"])
def test_activation_example_trains_and_keeps_capability(name):
    out = run_example(name, "--steps", "12")
    first, last = loss_first_last(out)
    assert last < first, (first, last)
    # the atax/* metrics of the activation projection are logged every step and printed
    rows = re.findall(r"^\s+\d+\s+[0-9.]+\s+([0-9.]+)\s+([0-9.]+)$", out, re.M)
    assert len(rows) == 12, out[-4000:]
    # (LoRA: step 1 moves only B, which starts at zero, so nothing of A's update is removed yet)
    assert all(0.0 <= float(removed) < 1.0 and float(rank) > 0 for removed, rank in rows), rows
    assert all(float(removed) > 0.0 for removed, _ in rows[1:]), rows
    kept = float(re.search(r"^capability kept: ([0-9.]+)", out, re.M).group(1))
    assert kept >= 0.9, out[-2000:]


def test_dpo_example_runs():
    out = run_example("dpo_tiny.py")
    assert "atax/cosine" in out
    assert len(re.findall(r"^\s+\d+\s+-?[0-9.]+\s+[0-9.]+\s+-?[0-9.]+", out, re.M)) == 6, out[-4000:]


# ----------------------------------------------------------------------------- the README as a newcomer reads it
ROOT = EXAMPLES.parent


def test_readme_install_section_before_the_api():
    text = (ROOT / "README.md").read_text()
    assert "\n## Install\n" in text and text.index("\n## Install\n") < text.index("\n## API\n")
    install = text[text.index("\n## Install\n"):text.index("\n## API\n")]
    for needle in ("pip install -e .", "'.[study]'", "make test", "'.[test]'"):
        assert needle in install, needle


def test_readme_defines_capability_kept_and_points_only_at_files_that_exist():
    text = (ROOT / "README.md").read_text()
    lower = text.lower()
    assert lower.index("**capability kept**") <= lower.index("capability kept"), "defined where first used"
    assert "issue's target" not in text and "the issue that" not in lower
    paths = set(re.findall(r"\]\(([^)#\s]+)", text))
    paths |= set(re.findall(r"`((?:docs|examples|bench|tests|scripts|atax_kernels|csrc)/[\w./-]+\.\w+)`", text))
    missing = sorted(p for p in paths if not p.startswith("http") and not (ROOT / p).exists())
    assert not missing, missing


def test_design_notes_are_shipped_and_every_reference_names_their_path():
    assert (ROOT / "docs" / "DESIGN.md").exists()
    bad = []
    for path in (ROOT / "atax_kernels").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "DESIGN.md" in line and "docs/DESIGN.md" not in line:
                bad.append(f"{path.relative_to(ROOT)}:{i}")
    assert not bad, f"say docs/DESIGN.md: {bad}"
