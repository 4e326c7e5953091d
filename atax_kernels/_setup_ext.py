"""Helpers shared by setup.py (AOT build) and atax_kernels._ext (JIT build).

No torch import at module level: setup.py may load this file directly, e.g.

    spec = importlib.util.spec_from_file_location("_setup_ext", "atax_kernels/_setup_ext.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    ext_modules = mod.ext_modules_for_setup()   # [] unless ATAX_BUILD_EXT=1
    cmdclass = mod.cmdclass_for_setup()
"""
from __future__ import annotations

import glob
import os
import re
import shutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")

CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-lineinfo"]  # no --use_fast_math: accuracy matters
DEFAULT_ARCH_LIST = "8.0;9.0"


# ----------------------------------------------------------------------------- sources
def cpu_sources(relative: bool = False) -> list[str]:
    srcs = [os.path.join(CSRC, "ops.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    return [os.path.relpath(s, REPO) for s in srcs] if relative else srcs


def cuda_sources(relative: bool = False) -> list[str]:
    srcs = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    return [os.path.relpath(s, REPO) for s in srcs] if relative else srcs


# ----------------------------------------------------------------------------- CUDA toolkit
def _has_cudart(home: str) -> bool:
    if os.path.isfile(os.path.join(home, "lib64", "libcudart.so")):
        return True
    return bool(glob.glob(os.path.join(home, "targets", "*", "lib", "libcudart.so")))


def valid_cuda_home(home: str | None) -> bool:
    """A real toolkit: bin/nvcc (a file) and libcudart.so (lib64/ or targets/*/lib/)."""
    if not home:
        return False
    nvcc = os.path.join(home, "bin", "nvcc")
    return os.path.isfile(nvcc) and os.access(nvcc, os.X_OK) and _has_cudart(home)


_NVCC_IN_TEXT = re.compile(r"(/[^\s\"'`;:|&<>()$]*/bin/nvcc)(?![\w.-])")


def _home_from_nvcc(path: str, depth: int = 0) -> str | None:
    """Resolve an nvcc (binary, symlink or wrapper script) to the toolkit root holding it."""
    if depth > 4 or not path:
        return None
    real = os.path.realpath(path)
    home = os.path.dirname(os.path.dirname(real))
    if valid_cuda_home(home):
        return home
    # A wrapper script: look for an absolute path to a real nvcc in its text.
    try:
        if os.path.getsize(real) > 256 * 1024:
            return None
        with open(real, "rb") as fh:
            text = fh.read().decode("utf-8", errors="ignore")
    except OSError:
        return None
    for cand in _NVCC_IN_TEXT.findall(text):
        if os.path.realpath(cand) == real:
            continue
        home = _home_from_nvcc(cand, depth + 1)
        if home:
            return home
    return None


def find_cuda_home() -> str | None:
    """CUDA_HOME / CUDA_PATH if valid, else nvcc on PATH (following wrapper scripts), else
    /usr/local/cuda, /usr/local/cuda-* (newest first). None if no real toolkit is found."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if valid_cuda_home(home):
            return os.path.abspath(home)
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _home_from_nvcc(nvcc)
        if home:
            return home
    cands = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in cands:
        if valid_cuda_home(home):
            return os.path.realpath(home)
    return None


def extra_cuda_include_flags() -> list[str]:
    """`-isystem` flags for CUDA library headers that pip wheels ship next to torch (e.g.
    site-packages/nvidia/cu13/include/cusparse.h, needed by ATen/cuda headers) when the toolkit lacks
    them. Appended after torch's own -isystem list, so the toolkit's headers keep precedence."""
    import site
    import sysconfig

    roots = []
    for r in [sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")] + list(
        getattr(site, "getsitepackages", lambda: [])()
    ):
        if r and r not in roots:
            roots.append(r)
    flags: list[str] = []
    for r in roots:
        for inc in sorted(glob.glob(os.path.join(r, "nvidia", "*", "include"))):
            if glob.glob(os.path.join(inc, "*.h")) and inc not in flags:
                flags += ["-isystem", inc]
    return flags


def prepare_cuda_env(home: str, gpu_visible: bool) -> None:
    """Point torch.utils.cpp_extension at the real toolkit (env + module attribute, since it reads
    CUDA_HOME at import) and set TORCH_CUDA_ARCH_LIST when no GPU is visible."""
    os.environ["CUDA_HOME"] = home
    if not gpu_visible and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    import sys

    mod = sys.modules.get("torch.utils.cpp_extension")
    if mod is not None:
        mod.CUDA_HOME = home


# ----------------------------------------------------------------------------- setup.py
def ext_modules_for_setup() -> list:
    """Extension list for `ATAX_BUILD_EXT=1 pip install --no-build-isolation -e .` ([] otherwise).
    Builds `atax_kernels._C`; CUDA sources are included under the same rules as the JIT build
    (ATAX_BUILD_CUDA=1 forces, =0 disables, unset: torch has CUDA and a real toolkit exists)."""
    if os.environ.get("ATAX_BUILD_EXT", "0") != "1":
        return []
    os.environ.setdefault("MAX_JOBS", "2")
    want = os.environ.get("ATAX_BUILD_CUDA")
    cu = cuda_sources(relative=True)
    home = find_cuda_home()
    use_cuda = False
    if want != "0" and cu and home:
        if want == "1":
            use_cuda = True
        else:
            import torch

            use_cuda = torch.version.cuda is not None
    if use_cuda:
        import torch

        prepare_cuda_env(home, torch.cuda.is_available())
        from torch.utils.cpp_extension import CUDAExtension

        return [
            CUDAExtension(
                name="atax_kernels._C",
                sources=cpu_sources(relative=True) + cu,
                include_dirs=[CSRC],
                extra_compile_args={
                    "cxx": CXX_FLAGS + ["-DATAX_WITH_CUDA"] + extra_cuda_include_flags(),
                    "nvcc": NVCC_FLAGS + ["-DATAX_WITH_CUDA"] + extra_cuda_include_flags(),
                },
                extra_link_args=LD_FLAGS,
            )
        ]
    from torch.utils.cpp_extension import CppExtension

    return [
        CppExtension(
            name="atax_kernels._C",
            sources=cpu_sources(relative=True),
            include_dirs=[CSRC],
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=LD_FLAGS,
        )
    ]


def cmdclass_for_setup() -> dict:
    if os.environ.get("ATAX_BUILD_EXT", "0") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}
