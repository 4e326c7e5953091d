"""Facts about the machine and the process that every benchmark report records: the environment header
(machine, date, commit, versions, command) and the process's resident-memory readings."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from typing import Sequence

import torch


def atax_version() -> str:
    """``atax_kernels.__version__`` (``"unknown"`` where it has none)."""
    import atax_kernels

    return str(getattr(atax_kernels, "__version__", "unknown"))


def is_cuda(device: str) -> bool:
    """Whether ``device`` names a CUDA device."""
    return torch.device(device).type == "cuda"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str, argv: Sequence[str]) -> dict:
    """The report header: machine, torch threads, UTC date, git commit, versions and the command line."""
    try:
        import triton  # noqa: F401

        triton_v = triton.__version__
    except Exception:
        triton_v = "not installed"
    if is_cuda(device) and torch.cuda.is_available():
        machine = f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda}); host CPU {_cpu_model()}"
    else:
        machine = f"{_cpu_model()}, {os.cpu_count()} cores"
    return {
        "machine": machine,
        "torch_threads": torch.get_num_threads(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_v,
        "atax_kernels": atax_version(),
        "command": " ".join([os.path.basename(sys.executable), "-m", "atax_kernels.bench", *argv]),
    }


def proc_status() -> dict[str, int]:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak resident) of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel does not allow it (the peak is then a bound)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def header_lines(env: dict, wall_s: float, *, with_atax_version: bool) -> list[str]:
    """The bulleted environment lines that open a markdown report (from :func:`environment`)."""
    versions = f"python {env['python']}, torch {env['torch']}, triton {env['triton']}"
    return [
        f"- machine: {env['machine']} (torch threads: {env['torch_threads']})",
        f"- date: {env['date_utc']}",
        f"- git commit: {env['git_commit']}",
        f"- versions: {versions}" + (f", atax_kernels {env['atax_kernels']}" if with_atax_version else ""),
        f"- command: `{env['command']}`",
        f"- wall time: {wall_s:.1f} s",
    ]
