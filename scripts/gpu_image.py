"""Helpers of ``scripts/gpu_check.sh`` that need Python: what the GPU image holds, the environment record,
the dry-run audit (imports and paths) and the final summary.

The GPU machines this project is lent have no network and no registry: a system ``python3`` (3.12) and the
packages in :data:`GPU_IMAGE` only. A step that imports anything else fails there on its first try, so the
dry run (CPU, CI) parses every Python file a step would run -- the selected test files, their local imports,
the ``atax_kernels`` modules they reach (function-level imports included) and the scripts -- and fails on an
import that is neither in the image nor guarded (inside ``try`` with an ``except ImportError``-like clause,
or asked for with ``pytest.importorskip``, which skips instead of failing).

Usage (from the repository root)::

    python3 scripts/gpu_image.py env OUT.json            # GPU name, driver, versions, commit
    python3 scripts/gpu_image.py audit PATH [PATH ...]    # exit 1 on a missing path or a forbidden import
    python3 scripts/gpu_image.py summary OUT.md STATUS.tsv ENV.json [BENCH.json]

Only the standard library is imported at module level (``env`` imports torch/triton when present).
"""
from __future__ import annotations

import ast
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Top-level modules the GPU image provides (the issue's list), by import name.
GPU_IMAGE = frozenset({
    "torch", "triton", "transformers", "pytest", "hypothesis", "scipy", "peft", "accelerate", "psutil",
    "matplotlib", "ninja",
})
#: Hard dependencies of those packages, hence present too (torch: sympy, networkx, jinja2, fsspec, filelock,
#: typing_extensions, setuptools on 3.12; transformers: numpy, packaging, yaml, regex, safetensors,
#: huggingface_hub, tokenizers, requests; matplotlib: PIL; pytest: _pytest, pluggy, iniconfig).
IMAGE_DEPENDENCIES = frozenset({
    "numpy", "sympy", "networkx", "jinja2", "fsspec", "filelock", "typing_extensions", "setuptools",
    "pkg_resources", "packaging", "yaml", "regex", "safetensors", "huggingface_hub", "tokenizers", "requests",
    "PIL", "_pytest", "pluggy", "iniconfig",
})
#: Known to be missing from the image (named in the error so the fix is obvious).
NOT_IN_IMAGE = frozenset({"trl", "datasets", "expecttest", "tqdm", "pytest_benchmark"})

LOCAL_PACKAGES = ("atax_kernels",)


def _allowed(top: str) -> bool:
    stdlib = getattr(sys, "stdlib_module_names", frozenset())
    return top in stdlib or top in GPU_IMAGE or top in IMAGE_DEPENDENCIES or top == "__future__"


def _guarded_lines(tree: ast.AST) -> set[int]:
    """Line numbers of import statements inside a ``try`` that catches ImportError (or broader)."""
    guarded: set[int] = set()
    catching = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        names: set[str] = set()
        for h in node.handlers:
            if h.type is None:
                names.add("BaseException")
            for t in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type] if h.type else []):
                if isinstance(t, ast.Name):
                    names.add(t.id)
        if names & catching:
            for stmt in node.body:
                for sub in ast.walk(stmt):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        guarded.add(sub.lineno)
    return guarded


def _imports(path: Path) -> list[tuple[int, str, bool, int]]:
    """(line, module, guarded, relative level) for every import statement of a file (all scopes)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    guarded = _guarded_lines(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, node.lineno in guarded, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            out.append((node.lineno, mod, node.lineno in guarded, node.level))
            if node.level or mod in LOCAL_PACKAGES or mod.startswith(tuple(p + "." for p in LOCAL_PACKAGES)):
                # `from . import x` / `from atax_kernels import x`: x may be a submodule
                base = mod
                out += [(node.lineno, f"{base}.{a.name}" if base else a.name, node.lineno in guarded, node.level)
                        for a in node.names]
    return out


def _resolve_local(mod: str, level: int, src: Path, search: list[Path]) -> Path | None:
    """File of a repository module, or None when ``mod`` is not one."""
    if level:
        base = src.parent
        for _ in range(level - 1):
            base = base.parent
        parts = mod.split(".") if mod else []
        cand = base.joinpath(*parts)
    else:
        parts = mod.split(".")
        cand = None
        for root in search:
            c = root.joinpath(*parts)
            if c.with_suffix(".py").is_file() or (c / "__init__.py").is_file():
                cand = c
                break
        if cand is None:
            return None
    if cand.with_suffix(".py").is_file():
        return cand.with_suffix(".py")
    if (cand / "__init__.py").is_file():
        return cand / "__init__.py"
    return None


def audit(paths: list[str]) -> list[str]:
    """Problems (missing paths, forbidden imports) of the files a gpu-check step would run."""
    problems: list[str] = []
    queue: list[Path] = []
    for p in paths:
        path = (REPO / p) if not os.path.isabs(p) else Path(p)
        if not path.exists():
            problems.append(f"missing path: {p}")
        elif path.suffix == ".py":
            queue.append(path)
    search = [REPO, REPO / "tests", REPO / "scripts"]
    seen: set[Path] = set()
    while queue:
        f = queue.pop()
        if f in seen:
            continue
        seen.add(f)
        rel = f.relative_to(REPO) if f.is_relative_to(REPO) else f
        try:
            imports = _imports(f)
        except SyntaxError as e:
            problems.append(f"{rel}: syntax error {e}")
            continue
        for line, mod, guarded, level in imports:
            local = _resolve_local(mod, level, f, search)
            if local is not None:
                queue.append(local)
                # importing a.b.c runs a/__init__ and a/b/__init__ too
                parent = local.parent if local.name != "__init__.py" else local.parent.parent
                while (parent / "__init__.py").is_file() and parent.is_relative_to(REPO) and parent != REPO:
                    queue.append(parent / "__init__.py")
                    parent = parent.parent
                continue
            if level:
                continue  # `from . import name` of a non-module attribute
            top = mod.split(".")[0]
            if not top or top in LOCAL_PACKAGES or _allowed(top) or guarded:
                continue
            if (REPO / "tests" / f"{top}.py").is_file() or (REPO / "scripts" / f"{top}.py").is_file():
                continue
            why = "not in the GPU image" + (" (known missing there)" if top in NOT_IN_IMAGE else "")
            problems.append(f"{rel}:{line}: import {mod!r}: {why}; guard it (try/except ImportError or "
                            f"pytest.importorskip) or drop it")
    return problems


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # a missing tool is recorded, never fatal
        return f"unavailable ({type(e).__name__})"


def environment() -> dict:
    """GPU name, driver, library versions and commit of this run."""
    env: dict = {
        "python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "commit": _run(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "dirty": bool(_run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])),
        "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.memory",
                            "--format=csv,noheader"]),
        "nvcc": _run(["nvcc", "--version"]).splitlines()[-1:] or [""],
    }
    env["nvcc"] = env["nvcc"][0] if env["nvcc"] else ""
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_capability"] = f"{p.major}.{p.minor}"
            env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
            env["gpu_count"] = torch.cuda.device_count()
            try:
                env["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
            except Exception:
                env["driver"] = None
    except Exception as e:
        env["torch"] = f"unavailable ({e!r})"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = f"unavailable ({type(e).__name__})"
    if not env.get("driver"):
        smi = env["nvidia_smi"]
        env["driver"] = smi.split(",")[1].strip() if smi.count(",") >= 1 and "unavailable" not in smi else None
    return env


def summary(out_md: str, status_tsv: str, env_json: str, bench_json: str | None) -> str:
    """One screen: the steps, their status and time, the environment and the bandwidth fractions."""
    env = json.loads(Path(env_json).read_text()) if Path(env_json).is_file() else {}
    rows = [ln.split("\t") for ln in Path(status_tsv).read_text().splitlines() if ln.strip()]
    lines = [
        f"# gpu-check {env.get('gpu', 'no GPU')} ({env.get('tier', '?')})",
        "",
        f"driver {env.get('driver')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
        f"triton {env.get('triton')}, python {env.get('python')}, {env.get('nvcc', '')}",
        f"commit {env.get('commit', '?')[:12]}{' (dirty)' if env.get('dirty') else ''}, {env.get('date', '')}",
        "",
        "| step | status | s | note |",
        "|---|---|---:|---|",
    ]
    for r in rows:
        r = (r + ["", "", "", ""])[:4]
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")
    if bench_json and Path(bench_json).is_file():
        b = json.loads(Path(bench_json).read_text())
        lines += ["", f"copy bandwidth {b.get('copy_gbps', float('nan')):.0f} GB/s "
                  f"(fraction = minimum traffic / time / copy bandwidth)", "",
                  "| case | k | backend | ms | GB/s | fraction |", "|---|---:|---|---:|---:|---:|"]
        for rec in b.get("records", []):
            lines.append(f"| {rec['case']} | {rec['k']} | {rec['backend']} | {rec['ms']:.3f} | "
                         f"{rec['gbps']:.0f} | {rec['fraction']:.2f} |")
    text = "\n".join(lines) + "\n"
    Path(out_md).write_text(text)
    return text


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "env":
        env = environment()
        for kv in args[1:]:  # extra key=value pairs (tier, date)
            k, _, v = kv.partition("=")
            env[k] = v
        Path(args[0]).write_text(json.dumps(env, indent=2, default=str) + "\n")
        print(json.dumps({k: env.get(k) for k in ("gpu", "driver", "torch", "triton", "python", "commit")}))
        return 0
    if cmd == "audit":
        problems = audit(args)
        for p in problems:
            print(f"[audit] {p}")
        print(f"[audit] {len(args)} paths, {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    if cmd == "summary":
        print(summary(args[0], args[1], args[2], args[3] if len(args) > 3 else None), end="")
        return 0
    print(f"unknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
