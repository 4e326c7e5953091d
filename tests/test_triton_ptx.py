"""The Triton kernels' aligned path compiles to 128-bit global accesses (sm_90 PTX, compiled without a GPU).

The kernels are compiled, not interpreted, in a separate process (tests/triton_ptx_probe.py). Counting
accesses in PTX is what CI can prove; whether the hardware then reaches its bandwidth is for `make gpu-check`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

PROBE = Path(__file__).with_name("triton_ptx_probe.py")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(PROBE.parent.parent)  # the repository, also when atax_kernels is not installed (make compat)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _wide_loads(acc):
    return sum(v for k, v in acc.items() if k.startswith("ld.global.v4") or k == "cp.async.128bit")


def _wide_stores(acc):
    return sum(v for k, v in acc.items() if k.startswith("st.global.v4"))


@pytest.mark.parametrize("flat", [False, True])
def test_combine_aligned_path_uses_128bit_loads_and_stores(report, flat):
    acc = report[f"combine aligned=True flat={flat}"]
    # full blocks: target + vector loads and the target store, for each of fp32 / fp16 / bf16
    assert _wide_loads(acc) >= 4, acc
    assert _wide_stores(acc) >= 3, acc


@pytest.mark.parametrize("m", [2, 5, 12])  # element-wise products (m <= 8) and tl.dot (m > 8)
@pytest.mark.parametrize("flat", [False, True])
def test_gram_aligned_path_uses_128bit_loads(report, m, flat):
    acc = report[f"gram m={m} aligned=True flat={flat}"]
    assert _wide_loads(acc) >= 3, acc  # at least one per input dtype


@pytest.mark.parametrize("name", ["combine", "gram m=2", "gram m=5", "gram m=12"])
@pytest.mark.parametrize("flat", [False, True])
def test_misaligned_path_is_scalar(report, name, flat):
    # the control: without the anchor-relative addressing nothing is 128-bit, so the checks above can fail
    acc = report[f"{name} aligned=False flat={flat}"]
    assert _wide_loads(acc) == 0 and _wide_stores(acc) == 0, acc
