"""Build / load the atax C++ (and optionally CUDA) extension.

Importing this module never compiles and never raises. `load()` builds on first call (cached in
process and on disk), printing one line to stderr while it compiles; on failure it warns once and
returns None so that the `torch` backend serves.

Environment:
  ATAX_BUILD_CUDA  "1": build csrc/cuda/*.cu too; "0": CPU only; unset: CUDA when torch has CUDA and
                   a real toolkit is found (see cuda_home()).
  MAX_JOBS         parallel compile jobs (default 2).
  ATAX_EXT_DIR     override the build directory root (default <repo>/build/ext, or
                   ~/.cache/atax_kernels/<hash> when the repo is not writable).
  ATAX_REBUILD     "1": ignore a cached build failure (failures are remembered for 6 h per
                   source digest + CXX/CC/CUDA_HOME/TORCH_CUDA_ARCH_LIST, so that a broken build is
                   not retried by every process).
  ATAX_NO_PREBUILT "1": skip the AOT-built atax_kernels._C module.
  ATAX_BUILD_VERBOSE "1": verbose compiler output.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import threading
import types
import warnings

from . import _setup_ext as _se

__all__ = ["load", "build_info", "cuda_home"]

_lock = threading.RLock()
_done = False
_module: types.ModuleType | None = None
_info: dict = {
    "loaded": False,
    "prebuilt": False,
    "name": None,
    "sources": [],
    "cuda": False,
    "build_dir": None,
    "cuda_home": None,
    "error": None,
    "cuda_error": None,
}
_cuda_home_cache: list = []


def cuda_home() -> str | None:
    """Root of a real CUDA toolkit (bin/nvcc + libcudart.so), or None. Honours CUDA_HOME/CUDA_PATH
    when valid, else resolves `nvcc` on PATH through wrapper scripts, else /usr/local/cuda*."""
    if not _cuda_home_cache:
        try:
            _cuda_home_cache.append(_se.find_cuda_home())
        except Exception:  # pragma: no cover - defensive
            _cuda_home_cache.append(None)
    return _cuda_home_cache[0]


def build_info() -> dict:
    """What load() did: sources, whether CUDA kernels were compiled, build dir, errors."""
    with _lock:
        return dict(_info)


# ----------------------------------------------------------------------------- internals
def _ops_registered() -> bool:
    try:
        import torch

        torch.ops.atax.gram  # noqa: B018
        return True
    except Exception:
        return False


def _tag(cuda: bool, sources: list[str], cflags: list[str], cuda_flags: list[str]) -> str:
    import torch

    h = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), sys.version, sys.executable,
                 str(cuda), " ".join(cflags), " ".join(cuda_flags),
                 os.environ.get("TORCH_CUDA_ARCH_LIST", "") if cuda else ""):
        h.update(part.encode())
        h.update(b"\0")
    for s in sources:
        h.update(os.path.relpath(s, _se.REPO).encode())
    return h.hexdigest()[:10]


def _src_digest(sources: list[str]) -> str:
    h = hashlib.sha256()
    for s in sorted(sources) + [os.path.join(_se.CSRC, "common.h")]:
        try:
            with open(s, "rb") as fh:
                h.update(fh.read())
        except OSError:
            pass
    for d in (_se.CSRC, os.path.join(_se.CSRC, "cpu"), os.path.join(_se.CSRC, "cuda")):
        for hdr in _headers(d):
            try:
                with open(hdr, "rb") as fh:
                    h.update(fh.read())
            except OSError:
                pass
    return h.hexdigest()


def _headers(d: str) -> list[str]:
    try:
        return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith((".h", ".cuh", ".hpp")))
    except OSError:
        return []


def _build_root() -> str:
    root = os.environ.get("ATAX_EXT_DIR")
    if root:
        return root
    repo_build = os.path.join(_se.REPO, "build", "ext")
    try:
        os.makedirs(repo_build, exist_ok=True)
        if os.access(repo_build, os.W_OK):
            return repo_build
    except OSError:
        pass
    h = hashlib.sha256(_se.REPO.encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser("~"), ".cache", "atax_kernels", h)


def _ensure_ninja_on_path() -> None:
    if shutil.which("ninja"):
        return
    bindir = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(bindir, "ninja")):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def _short(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    # Keep the informative tail (compiler errors come last).
    errs = [ln for ln in lines if "error" in ln.lower()]
    keep = (errs[:3] if errs else []) + lines[-2:]
    out = " | ".join(dict.fromkeys(keep))
    return out[:1500]


def _read_text(path: str) -> str:
    """The file's text, with the handle closed at once (a bare ``open().read()`` leaks it until GC)."""
    with open(path) as fh:
        return fh.read()


def _try_build(cuda: bool) -> types.ModuleType:
    """Compile (or reuse the cached build) and import. Raises on failure."""
    import torch

    sources = _se.cpu_sources() + (_se.cuda_sources() if cuda else [])
    inc = _se.extra_cuda_include_flags() if cuda else []
    cflags = list(_se.CXX_FLAGS) + (["-DATAX_WITH_CUDA"] + inc if cuda else [])
    cuda_flags = list(_se.NVCC_FLAGS) + ["-DATAX_WITH_CUDA"] + inc if cuda else []
    if cuda:
        home = cuda_home()
        if home is None:
            raise RuntimeError("no CUDA toolkit found (set CUDA_HOME)")
        _se.prepare_cuda_env(home, torch.cuda.is_available())
        _info["cuda_home"] = home
    name = f"atax_kernels_{'cuda' if cuda else 'cpu'}_{_tag(cuda, sources, cflags, cuda_flags)}"
    build_dir = os.path.join(_build_root(), name)
    os.makedirs(build_dir, exist_ok=True)
    _info.update(name=name, sources=[os.path.relpath(s, _se.REPO) for s in sources], build_dir=build_dir)

    # Remember failures on disk (keyed by the source digest) so a broken build is not retried by
    # every process.
    digest = _src_digest(sources)
    fail_key = hashlib.sha256("\0".join(
        [digest] + [os.environ.get(v, "") for v in ("CXX", "CC", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST")]
    ).encode()).hexdigest()
    fail_marker = os.path.join(build_dir, "FAILED")
    import time

    if (os.path.isfile(fail_marker) and os.environ.get("ATAX_REBUILD", "0") != "1"
            and time.time() - os.path.getmtime(fail_marker) < 6 * 3600):
        try:
            with open(fail_marker) as fh:
                dig, _, reason = fh.read().partition("\n")
            if dig == fail_key:
                raise RuntimeError(f"previous build failed (cached; delete {fail_marker} to retry): {reason}")
        except OSError:
            pass

    so = os.path.join(build_dir, name + ".so")
    ok_marker = os.path.join(build_dir, "BUILT")
    fresh = os.path.isfile(so) and os.path.isfile(ok_marker) and _read_text(ok_marker) == digest
    if not fresh:
        print(f"atax_kernels: building {'C++/CUDA' if cuda else 'C++'} extension (once, ~1 min"
              f"{'+' if cuda else ''})...", file=sys.stderr, flush=True)
    os.environ.setdefault("MAX_JOBS", "2")
    _ensure_ninja_on_path()
    if "torch.utils.cpp_extension" not in sys.modules and not os.environ.get("CUDA_HOME"):
        home = cuda_home()  # stops torch guessing a wrong CUDA_HOME from a wrapper `nvcc`
        if home:
            os.environ["CUDA_HOME"] = home
    import logging

    _lg = logging.getLogger("torch.utils.cpp_extension")
    _old_level = _lg.level
    _lg.setLevel(logging.ERROR)  # its import-time CUDA_HOME notice is noise here
    try:
        from torch.utils import cpp_extension
    finally:
        _lg.setLevel(_old_level)
    if cuda:  # it computed CUDA_HOME at import time
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]

    try:
        mod = cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags if cuda else None,
            extra_ldflags=list(_se.LD_FLAGS),
            extra_include_paths=[_se.CSRC],
            build_directory=build_dir,
            with_cuda=cuda,
            verbose=os.environ.get("ATAX_BUILD_VERBOSE", "0") == "1",
        )
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        try:
            with open(fail_marker, "w") as fh:
                fh.write(fail_key + "\n" + _short(exc))
        except OSError:
            pass
        raise
    try:
        with open(ok_marker, "w") as fh:
            fh.write(digest)
        if os.path.isfile(fail_marker):
            os.remove(fail_marker)
    except OSError:
        pass
    return mod


def _want_cuda() -> tuple[bool, str | None]:
    env = os.environ.get("ATAX_BUILD_CUDA")
    if env == "0":
        return False, None
    if not _se.cuda_sources():
        return False, ("ATAX_BUILD_CUDA=1 but csrc/cuda/ has no .cu files" if env == "1" else None)
    if env == "1":
        return True, None
    try:
        import torch

        if torch.version.cuda is None:
            return False, None
    except Exception:
        return False, None
    return cuda_home() is not None, None


def load() -> types.ModuleType | None:
    """Return the loaded extension module (ops registered in torch.ops.atax), or None if it cannot be
    built. Builds on first call; never raises (except KeyboardInterrupt)."""
    global _done, _module
    if _done:
        return _module
    with _lock:
        if _done:
            return _module
        try:
            _module = _load_impl()
        except Exception as exc:  # pragma: no cover - defensive
            _info["error"] = _short(exc)
            warnings.warn(f"atax_kernels: C++ extension unavailable ({_info['error']}); "
                          "using the torch backend", RuntimeWarning, stacklevel=2)
            _module = None
        _info["loaded"] = _module is not None
        _done = True
        return _module


def _load_impl() -> types.ModuleType | None:
    # 1. Prebuilt (AOT, `ATAX_BUILD_EXT=1 pip install --no-build-isolation -e .`).
    if os.environ.get("ATAX_NO_PREBUILT", "0") != "1":
        try:
            mod = importlib.import_module("atax_kernels._C")
            if _ops_registered():
                import torch

                _info.update(prebuilt=True, name="atax_kernels._C",
                             build_dir=os.path.dirname(getattr(mod, "__file__", "") or ""),
                             cuda=torch._C._dispatch_has_kernel_for_dispatch_key("atax::gram", "CUDA"))
                return mod
        except Exception:
            pass
    # Ops already registered by some other load in this process: do not register twice.
    if _ops_registered():
        import torch

        _info.update(cuda=torch._C._dispatch_has_kernel_for_dispatch_key("atax::gram", "CUDA"))
        return types.ModuleType("atax_kernels_preloaded")

    # 2. JIT build: CUDA first when wanted, else / on failure CPU only.
    want_cuda, why = _want_cuda()
    if why:
        _info["cuda_error"] = why
        warnings.warn(f"atax_kernels: {why}; building the CPU-only extension", RuntimeWarning, stacklevel=3)
    if want_cuda:
        mod = _build_or_warn(cuda=True, fallback="falling back to the CPU-only extension")
        if mod is not None:
            return mod
        _info["cuda_home"] = None
    return _build_or_warn(cuda=False, fallback="using the torch backend")


def _build_or_warn(*, cuda: bool, fallback: str) -> types.ModuleType | None:
    """One JIT build attempt; on failure the reason is recorded in build_info() and said in a warning."""
    try:
        mod = _try_build(cuda=cuda)
        _info["cuda"] = cuda
        return mod
    except Exception as exc:
        key = "cuda_error" if cuda else "error"
        _info[key] = _short(exc)
        what = "CUDA extension" if cuda else "C++ extension"
        warnings.warn(f"atax_kernels: {what} build failed ({_info[key]}); {fallback}", RuntimeWarning, stacklevel=4)
        return None
