"""Compile-level checks of the CUDA kernels (csrc/cuda/*.cu); no GPU needed.

(a) nvcc for sm_80 and sm_90 with `-Xptxas -v`: every kernel reports 0 bytes of spill stores/loads.
(b) `cuobjdump -sass`: the combine kernel uses 128-bit global loads/stores on the aligned path.
(c) when atax_kernels._ext built the CUDA extension, the atax ops have CUDA kernels.

Each .cu file is compiled ONCE per session (both archs in one nvcc call, the two files in parallel).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(REPO, "csrc", "cuda")
SOURCES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
ARCHS = ("80", "90")

pytestmark = pytest.mark.skipif(not SOURCES, reason="no csrc/cuda/*.cu sources")


def _cuda_home() -> str | None:
    try:
        sys.path.insert(0, REPO)
        from atax_kernels import _setup_ext  # no torch import

        home = _setup_ext.find_cuda_home()
        if home:
            return home
    except Exception:
        pass
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if cand and os.path.isfile(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


def _find_cuobjdump(home: str) -> str | None:
    cands = [os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:  # triton wheels bundle one
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except Exception:
        pass
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _include_dirs(home: str) -> list[str]:
    if not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home  # before cpp_extension guesses a wrong one from a wrapper nvcc
    from torch.utils import cpp_extension

    try:
        inc = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch
        inc = cpp_extension.include_paths(cuda=True)
    inc = list(inc) + [os.path.join(home, "include")]
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    inc += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))  # cusparse.h etc. (pip CUDA)
    inc.append(sysconfig.get_paths()["include"])
    return [d for d in dict.fromkeys(inc) if os.path.isdir(d)]


def _cxx_std() -> str:
    import torch

    aten_h = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        with open(aten_h) as fh:
            if "C++20" in fh.read():
                return "-std=c++20"
    except OSError:
        pass
    return "-std=c++17"


@pytest.fixture(scope="session")
def cuda_objects(tmp_path_factory):
    home = _cuda_home()
    if home is None:
        pytest.skip("nvcc (a CUDA toolkit) not found: set CUDA_HOME to check the CUDA kernels")
    pytest.importorskip("torch")
    import torch

    nvcc = os.path.join(home, "bin", "nvcc")
    out = tmp_path_factory.mktemp("atax_cuda_build")
    flags = [_cxx_std(), "-O3", "-lineinfo", "-Xptxas", "-v", "-DATAX_WITH_CUDA",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    for a in ARCHS:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += [f"-I{d}" for d in _include_dirs(home)]
    procs = {}
    for src in SOURCES:
        name = os.path.splitext(os.path.basename(src))[0]
        obj = str(out / f"{name}.o")
        procs[name] = (obj, subprocess.Popen([nvcc, "-c", src, "-o", obj, *flags], stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True))
    results = {}
    for name, (obj, p) in procs.items():
        log, _ = p.communicate(timeout=1800)
        results[name] = {"obj": obj, "log": log, "rc": p.returncode}
    return {"home": home, "results": results}


def _ptxas_kernels(log: str) -> list[tuple[str, str, int, int]]:
    """(function, arch, spill_stores, spill_loads) for every 'Function properties' block of a kernel."""
    out = []
    arch = "?"
    lines = log.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            arch = m.group(2)
        m = re.search(r"Function properties for (\S+)", line)
        if m and i + 1 < len(lines):
            s = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", lines[i + 1])
            if s:
                out.append((m.group(1), arch, int(s.group(1)), int(s.group(2))))
    return out


def test_cuda_sources_compile(cuda_objects):
    for name, r in cuda_objects["results"].items():
        assert r["rc"] == 0, f"nvcc failed on {name}.cu:\n{r['log'][-6000:]}"
        assert os.path.isfile(r["obj"])


def test_no_register_spills(cuda_objects):
    for name, r in cuda_objects["results"].items():
        assert r["rc"] == 0, f"nvcc failed on {name}.cu"
        kernels = _ptxas_kernels(r["log"])
        assert kernels, f"no ptxas -v output for {name}.cu:\n{r['log'][-3000:]}"
        archs = {a for _, a, _, _ in kernels}
        assert {f"sm_{a}" for a in ARCHS} <= archs, (name, archs)
        spilled = [k for k in kernels if k[2] or k[3]]
        assert not spilled, f"register spills in {name}.cu: {spilled}"


_LDG128 = re.compile(r"\bLDG\.E(?:\.[A-Z0-9_]+)*\.(?:128|ENL2[A-Z0-9_.]*)\b")
_STG128 = re.compile(r"\bSTG\.E(?:\.[A-Z0-9_]+)*\.(?:128|ENL2[A-Z0-9_.]*)\b")


def _sass_functions(sass: str) -> dict[str, str]:
    funcs, cur = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = ""
        elif cur is not None:
            funcs[cur] += line + "\n"
    return funcs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src,kernel", [("combine", "combine_kernel"), ("gram", "gram_small_kernel")])
def test_sass_has_128bit_loads(cuda_objects, arch, src, kernel):
    r = cuda_objects["results"].get(src)
    if r is None:
        pytest.skip(f"no {src}.cu")
    assert r["rc"] == 0, f"nvcc failed on {src}.cu"
    tool = _find_cuobjdump(cuda_objects["home"])
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin/ or triton's bundled copy)")
    p = subprocess.run([tool, "-sass", "-arch", f"sm_{arch}", r["obj"]], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    funcs = {k: v for k, v in _sass_functions(p.stdout).items() if kernel in k}
    assert funcs, f"{kernel} not found in the sm_{arch} SASS of {src}.o"
    for fname, body in funcs.items():
        assert _LDG128.search(body), f"{fname} (sm_{arch}) has no 128-bit global load"
        if src == "combine":
            assert _STG128.search(body), f"{fname} (sm_{arch}) has no 128-bit global store"


def test_extension_registers_cuda_kernels():
    torch = pytest.importorskip("torch")
    try:
        from atax_kernels import _ext
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"atax_kernels._ext not importable: {exc}")
    _ext.load()
    info = _ext.build_info()
    if not info.get("cuda"):
        pytest.skip(f"the CUDA extension was not built here: {info}")
    for op in ("atax::gram", "atax::combine_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
