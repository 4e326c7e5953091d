#!/usr/bin/env bash
# `make compat`: the ops / projection / Triton-interpreter tests under the GPU image's versions
# (Python 3.12, torch 2.11.0, triton 3.6.0) in a second venv, .venv-compat (gitignored), on CPU.
# Needs a registry the first time (torch 2.11.0 from PyPI is a CUDA build: a few GB). PYTHON312 overrides
# the interpreter (default: pyenv's newest 3.12, else python3.12 on PATH).
set -eu
cd "$(dirname "$0")/.."
VENV="${COMPAT_VENV:-.venv-compat}"
PY312="${PYTHON312:-}"
if [ -z "$PY312" ]; then
  PY312="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python 2>/dev/null | sort -V | tail -1 || true)"
  [ -n "$PY312" ] || PY312="$(command -v python3.12 || true)"
fi
[ -n "$PY312" ] || { echo "[compat] no Python 3.12 found (set PYTHON312)" >&2; exit 2; }
if [ ! -f "$VENV/.installed" ]; then
  [ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
  # numpy < 2.3: triton 3.6's interpreter converts 1-element arrays with int(): numpy 2.2 warns, 2.5 raises
  "$VENV/bin/pip" install -q "torch==2.11.0" "triton==3.6.0" "numpy<2.3" pytest hypothesis scipy psutil
  touch "$VENV/.installed"
fi
"$VENV/bin/python" -c "import sys, torch, triton; print('[compat] python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
# The extension is built per torch version into its own folder, so this venv never touches .venv's build.
# CPU extension only (a CUDA build takes minutes and nothing here can run it).
export ATAX_EXT_DIR="${ATAX_EXT_DIR:-build/ext-compat}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TRITON_INTERPRET=1 ATAX_BUILD_CUDA=0
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_projection.py \
  tests/test_triton_kernels.py tests/test_triton_ptx.py tests/test_gpu_hygiene.py tests/test_gpu_check_dryrun.py "$@"
