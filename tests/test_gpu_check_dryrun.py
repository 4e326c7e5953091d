"""`scripts/gpu_check.sh --dry-run`: the rehearsal of `make gpu-check` on a machine without a GPU.

It must pass here (every step walked, GPU steps skipped with a reason, results <= 8 files, summary last),
and its audit must fail on what would fail on the GPU image: an import of a package the image lacks, a
missing file. The audit's own checks are tested on planted files so that they can be seen to fail.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _gpu_image():
    spec = importlib.util.spec_from_file_location("gpu_image", REPO / "scripts" / "gpu_image.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_OUT=str(out), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    return proc, out


def test_dry_run_passes_and_walks_every_step(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    text = proc.stdout
    for name in ("env", "image-audit", "build", "cuda-kernels-registered", "pytest-collect", "memcheck",
                 "racecheck", "bench"):
        assert re.search(rf"^\| {re.escape(name)} \| (OK|SKIPPED) \|", text, re.M), name
    # GPU-only steps say why they were skipped
    assert re.search(r"^\| memcheck \| SKIPPED \| 0 \| dry run: needs a GPU", text, re.M)
    # the summary is the last thing printed
    tail = text.strip().splitlines()[-1]
    assert tail.startswith("gpu-check (full, dry run): PASSED"), tail


def test_dry_run_results(dry_run):
    proc, out = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert 1 <= len(files) <= 8, files
    md = (out / "dry-run.md").read_text()
    assert "| step | status |" in md and "fraction" in md
    import json

    env = json.loads((out / "dry-run-env.json").read_text())
    for key in ("torch", "triton", "python", "commit", "driver", "nvidia_smi"):
        assert key in env, key
    bench = json.loads((out / "dry-run-bench.json").read_text())
    cases = {r["case"].split(" ")[0] for r in bench["records"]}
    assert cases == {"GPT-2", "Llama-7B"} and bench["copy_gbps"] > 0
    assert all(r["fraction"] > 0 and r["error"] is None for r in bench["records"])


def test_audit_flags_packages_missing_from_the_image(tmp_path):
    gi = _gpu_image()
    bad = tmp_path / "test_bad.py"
    bad.write_text(
        "import os\nimport torch\nimport trl\n"
        "def f():\n    from tqdm import tqdm\n"
        "try:\n    import datasets\nexcept ImportError:\n    datasets = None\n"
        "import pytest\nexpecttest = pytest.importorskip('expecttest')\n"
    )
    problems = gi.audit([str(bad)])
    flagged = sorted(re.search(r"import '([^']+)'", p).group(1) for p in problems)
    assert flagged == ["tqdm", "trl"], problems  # guarded datasets and importorskip'd expecttest pass


def test_audit_follows_local_imports_and_flags_missing_paths(tmp_path, monkeypatch):
    gi = _gpu_image()
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "helper.py").write_text("import expecttest\n")
    (tmp_path / "tests" / "test_x.py").write_text("import helper\n")
    monkeypatch.setattr(gi, "REPO", tmp_path)
    problems = gi.audit(["tests/test_x.py", "scripts/nope.py"])
    assert any("tests/helper.py" in p and "'expecttest'" in p for p in problems), problems
    assert any(p == "missing path: scripts/nope.py" for p in problems), problems


def test_audit_of_the_real_selection_is_clean_and_reaches_the_package():
    gi = _gpu_image()
    seen: list[Path] = []
    real = gi._imports

    def spy(path):
        seen.append(path)
        return real(path)

    gi._imports = spy
    assert gi.audit(["tests/test_ops.py", "scripts/gpu_bench.py"]) == []
    names = {str(p.relative_to(REPO)) for p in seen}
    # function-level imports are followed: the backends and the benchmark core
    assert {"atax_kernels/projection/__init__.py", "atax_kernels/ops/registry.py", "atax_kernels/bench/cases.py"} <= names


def test_make_target_has_no_venv_step_and_uses_python3():
    make = (REPO / "Makefile").read_text()
    line = re.search(r"^gpu-check:(.*)$", make, re.M)
    assert line and line.group(1).strip() == "", line and line.group(0)
    script = SCRIPT.read_text()
    assert 'PY="${PYTHON:-python3}"' in script
    assert "pip install" not in script and ".venv" not in script
