#!/usr/bin/env bash
# Body of `make gpu-check`: build, test on CUDA, sanitize, benchmark. Run on a machine with a GPU.
# Exit status non-zero when any step fails; a summary is printed at the end.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"

declare -a NAMES=() STATUS=()
step() {  # step NAME CMD...
  local name="$1"; shift
  echo; echo "=== [gpu-check] $name: $*"
  "$@"
  local rc=$?
  NAMES+=("$name"); STATUS+=("$rc")
  [ "$rc" -eq 0 ] && echo "=== [gpu-check] $name: OK" || echo "=== [gpu-check] $name: FAILED (rc=$rc)"
  return 0
}

if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "[gpu-check] no CUDA device visible to torch: nothing to check" >&2
  exit 2
fi
GPU_NAME="$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")"
SLUG="$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')"
echo "[gpu-check] device: $GPU_NAME ($SLUG)"

# 1. build the extension (CUDA kernels included)
step build env ATAX_BUILD_CUDA=1 "$PY" -m atax_kernels.build
step cuda-kernels-registered "$PY" -c "
import torch, sys
from atax_kernels import _ext
_ext.load()
ok = all(torch._C._dispatch_has_kernel_for_dispatch_key(o, 'CUDA') for o in ('atax::gram', 'atax::combine_'))
print(_ext.build_info()); sys.exit(0 if ok else 1)"

# 2. the whole suite on CUDA tensors, plus the CUDA runtime tests
step pytest-cuda env ATAX_TEST_DEVICE=cuda "$PY" -m pytest -q -x tests
step pytest-cuda-runtime "$PY" -m pytest -q tests/test_cuda_runtime.py

# 3. compute-sanitizer
SAN=""
for c in compute-sanitizer "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda*/bin/compute-sanitizer; do
  if command -v "$c" >/dev/null 2>&1; then SAN="$(command -v "$c")"; break; fi
done
if [ -n "$SAN" ]; then
  step memcheck "$SAN" --tool memcheck --error-exitcode 3 --leak-check no "$PY" scripts/sanitize_case.py
  step racecheck "$SAN" --tool racecheck --error-exitcode 3 --racecheck-report all "$PY" scripts/sanitize_case.py
else
  echo "[gpu-check] compute-sanitizer not found"; NAMES+=("sanitizer-missing"); STATUS+=(1)
fi

# 4. benchmark
mkdir -p bench/results
step bench "$PY" -m atax_kernels.bench --device cuda --markdown "bench/results/${SLUG}.md"

echo; echo "=== [gpu-check] summary ($GPU_NAME)"
FAIL=0
for i in "${!NAMES[@]}"; do
  if [ "${STATUS[$i]}" -eq 0 ]; then r=OK; else r="FAILED (rc=${STATUS[$i]})"; FAIL=1; fi
  printf '  %-26s %s\n' "${NAMES[$i]}" "$r"
done
exit $FAIL
