#!/usr/bin/env bash
# Body of `make gpu-check`: build, CUDA tests, compute-sanitizer, bandwidth benchmark, one-screen summary.
#
#   bash scripts/gpu_check.sh [--quick] [--dry-run] [--memory]
#
# Made for a bare GPU machine: no venv, no install, no network. Python is `python3` (env PYTHON overrides) and
# must already hold torch + triton (the image: python 3.12, torch 2.11.0+cu130, triton 3.6.0, pytest,
# hypothesis, scipy, transformers, peft, accelerate, psutil, matplotlib, ninja, nvcc, compute-sanitizer).
# Tiers: --quick (every step capped so the whole run stays <= 4 min on an H200 with 16 cores, build included)
# and full (default, <= 8 min). Each step has a time cap; one that runs over is reported TIMEOUT and the
# others still run (no -x: one failure never hides the rest).
# --dry-run walks every step on a machine without a GPU (CI): GPU steps are skipped with their reason; it
# FAILS when a step would import a package the GPU image lacks or use a file that is not in the repository.
# --memory adds the benchmark's per-implementation peak-memory subprocesses (python -m atax_kernels.bench).
# Results (at most 8 files) go to $GPU_CHECK_OUT (default bench/results/), named after the GPU.
set -u
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PYTHON:-python3}"
OUT="${GPU_CHECK_OUT:-bench/results}"
TIER=full; DRY=0; MEMORY=0
for a in "$@"; do
  case "$a" in
    --quick) TIER=quick ;;
    --full) TIER=full ;;
    --dry-run) DRY=1 ;;
    --memory) MEMORY=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "[gpu-check] unknown argument: $a" >&2; exit 2 ;;
  esac
done
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET ATAX_BACKEND

# The CUDA-relevant tests (the CPU-only suite runs in CI). quick: the CUDA runtime paths, the compiled
# Triton kernels, the projection on CUDA tensors and its hygiene; full adds every backend through the
# registry (test_ops), the projection modes, bad input, properties and the other GPU-aware modules.
QUICK_TESTS="tests/test_cuda_runtime.py tests/test_gpu_project.py tests/test_gpu_remove_span.py tests/test_triton_kernels.py tests/test_gpu_hygiene.py"
FULL_TESTS="$QUICK_TESTS tests/test_remove_span.py tests/test_activation.py tests/test_ops.py tests/test_projection.py tests/test_bad_input.py tests/test_properties.py tests/test_interpolate.py tests/test_tax.py"
# Step caps (s): the heavy steps' caps sum to 230 s (quick) and 470 s (full; + 120 s for DeepSpeed where installed); env, audit and the registration
# check take seconds (their 60 s caps only guard against a hang), so a tier stays within 4 / 8 minutes.
if [ "$TIER" = quick ]; then
  TESTS="$QUICK_TESTS"; T_BUILD=120; T_TEST=60; T_MEMCHECK=20; T_RACECHECK=0; T_BENCH=30; SAN_BACKEND=cuda
else
  TESTS="$FULL_TESTS"; T_BUILD=150; T_TEST=190; T_MEMCHECK=45; T_RACECHECK=40; T_BENCH=45; SAN_BACKEND=all
fi
# Every file a step runs or reads: the dry run checks they exist and audits their imports.
FILES="atax_kernels/build.py scripts/gpu_image.py scripts/gpu_bench.py scripts/sanitize_case.py tests/conftest.py $TESTS"

if [ "$DRY" = 1 ]; then
  SLUG=dry-run
else
  if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "[gpu-check] no CUDA device visible to $PY's torch (use --dry-run on a machine without a GPU)" >&2
    exit 2
  fi
  GPU_NAME="$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")"
  SLUG="$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')"
fi
mkdir -p "$OUT"
P="$OUT/$SLUG"   # result files: $P.md (summary + bench), $P-env.json, $P-build.log, $P-pytest.log,
                 # $P-pytest.xml, $P-sanitizer.log, $P-bench.json  (7 files)
STATUS_TSV="$(mktemp)"; trap 'rm -f "$STATUS_TSV"' EXIT
: > "$P-sanitizer.log"
FAIL=0

record() {  # record NAME STATUS SECONDS NOTE
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STATUS_TSV"
  case "$2" in OK|SKIPPED) ;; *) FAIL=1 ;; esac
}
step() {  # step NAME CAP_S LOG CMD...   (LOG: file the output is appended to, "-" = only the terminal)
  local name="$1" cap="$2" log="$3"; shift 3
  echo; echo "=== [gpu-check] $name (cap ${cap}s): $*"
  local t0=$SECONDS rc
  if [ "$log" = "-" ]; then
    timeout -k 5 "$cap" "$@"; rc=$?
  else
    { echo "### $name: $*"; } >> "$log"
    timeout -k 5 "$cap" "$@" 2>&1 | tee -a "$log"; rc=${PIPESTATUS[0]}
  fi
  local dt=$((SECONDS - t0)) st=OK note=""
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then st=TIMEOUT; note="over its ${cap}s cap"
  elif [ "$rc" -ne 0 ]; then st=FAILED; note="rc=$rc"; fi
  [ -n "$log" ] && [ "$log" != "-" ] && [ "$st" != OK ] && note="$note, see $(basename "$log")"
  record "$name" "$st" "$dt" "$note"
  echo "=== [gpu-check] $name: $st ${note}"
}
skip() {  # skip NAME REASON
  echo; echo "=== [gpu-check] $1: SKIPPED ($2)"
  record "$1" SKIPPED 0 "$2"
}

# 0. environment record + the image audit (cheap, both modes)
step env 60 - "$PY" scripts/gpu_image.py env "$P-env.json" "tier=$TIER" "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
step image-audit 60 - "$PY" scripts/gpu_image.py audit $FILES

# 1. build the extension with its CUDA kernels
if [ "$DRY" = 1 ]; then
  skip build "dry run: would run ATAX_BUILD_CUDA=1 $PY -m atax_kernels.build (CI builds the extension itself)"
  skip cuda-kernels-registered "dry run: needs the CUDA build"
else
  : > "$P-build.log"
  step build "$T_BUILD" "$P-build.log" env ATAX_BUILD_CUDA=1 "$PY" -m atax_kernels.build
  step cuda-kernels-registered 60 "$P-build.log" "$PY" -c "
import sys, torch
from atax_kernels import _ext
_ext.load()
ok = all(torch._C._dispatch_has_kernel_for_dispatch_key(o, 'CUDA') for o in ('atax::gram', 'atax::combine_'))
print('atax CUDA kernels registered:', ok); sys.exit(0 if ok else 1)"
fi

# 2. the CUDA-relevant tests on CUDA tensors (no -x)
if [ "$DRY" = 1 ]; then
  # collection imports every selected test module: the rehearsal of the imports and the fixtures' setup
  step pytest-collect 300 "$P-pytest.log" env ATAX_TEST_DEVICE=cpu TRITON_INTERPRET=1 "$PY" -m pytest -q \
    -p no:cacheprovider --collect-only $TESTS
else
  : > "$P-pytest.log"
  step pytest-cuda "$T_TEST" "$P-pytest.log" env ATAX_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    -o addopts="" -rfEs --junitxml="$P-pytest.xml" $TESTS
fi

# 3. compute-sanitizer on the atax kernels only (kernel-name filter), caching allocator off for memcheck
SAN=""
for c in compute-sanitizer "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda*/bin/compute-sanitizer; do
  if command -v "$c" >/dev/null 2>&1; then SAN="$(command -v "$c")"; break; fi
done
if [ "$DRY" = 1 ]; then
  skip memcheck "dry run: needs a GPU (${SAN:-compute-sanitizer not on this machine})"
  skip racecheck "dry run: needs a GPU"
elif [ -z "$SAN" ]; then
  record compute-sanitizer FAILED 0 "compute-sanitizer not found"
else
  # only the atax kernels (CUDA: namespace atax::cuda; Triton: atax_* kernels); torch's own are skipped
  FILTER=(--kernel-name kns=atax)
  "$SAN" --help 2>/dev/null | grep -q -- "--kernel-name" || { FILTER=(); echo "[gpu-check] no --kernel-name filter in this compute-sanitizer: unfiltered"; }
  step memcheck "$T_MEMCHECK" "$P-sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck \
    "${FILTER[@]}" --error-exitcode 3 --leak-check no "$PY" scripts/sanitize_case.py --backend "$SAN_BACKEND"
  if [ "$TIER" = full ]; then
    step racecheck "$T_RACECHECK" "$P-sanitizer.log" "$SAN" --tool racecheck "${FILTER[@]}" \
      --error-exitcode 3 --racecheck-report all "$PY" scripts/sanitize_case.py --backend cuda
  else
    skip racecheck "quick tier"
  fi
fi

# 4. bandwidth: fraction of the device copy bandwidth, GPT-2 small and Llama-7B shapes, bf16, k = 1 and 4
rm -f "$P.md"
if [ "$DRY" = 1 ]; then
  step bench 120 - "$PY" scripts/gpu_bench.py --device cpu --tiny --k 1 --backends torch \
    --json "$P-bench.json" --markdown "$P-bench-tables.md"
else
  step bench "$T_BENCH" - "$PY" scripts/gpu_bench.py --device cuda --tier "$TIER" \
    --json "$P-bench.json" --markdown "$P-bench-tables.md"
  if [ "$MEMORY" = 1 ]; then
    step bench-memory 300 - "$PY" -m atax_kernels.bench --device cuda --dtype bf16 --k 1,4 --repeat 5 --no-progress \
      --markdown "$P-bench-memory.md"
  fi
fi

# 5. DeepSpeed ZeRO on the GPU(s) (scripts/gpu_deepspeed.py): fp16 with dynamic loss scaling and overflow-skipped
# steps, bf16, NCCL, stages 1-3, gradient (live, EMA) and activation space: what the CPU tests (gloo, fp32/bf16)
# cannot run. One process per GPU; on one GPU its multi-GPU part reports itself skipped. Output in the pytest log.
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
  skip deepspeed "deepspeed is not importable by $PY (the atax_kernels[deepspeed] extra); the image has none"
elif [ "$DRY" = 1 ]; then
  skip deepspeed "dry run: needs a GPU ($PY -m torch.distributed.run scripts/gpu_deepspeed.py)"
elif [ "$TIER" = quick ]; then
  skip deepspeed "quick tier"
else
  NGPU="$("$PY" -c "import torch; print(torch.cuda.device_count())")"
  step deepspeed 120 "$P-pytest.log" "$PY" -m torch.distributed.run --nproc_per_node "$NGPU" scripts/gpu_deepspeed.py
fi

# 6. summary (printed last; the full bench tables are appended to the same file afterwards)
TABLES="$(cat "$P-bench-tables.md" "$P-bench-memory.md" 2>/dev/null)"
rm -f "$P-bench-tables.md" "$P-bench-memory.md" "$P.md"
[ -s "$P-sanitizer.log" ] || rm -f "$P-sanitizer.log"
NFILES=$(( $(find "$OUT" -maxdepth 1 -type f -name "$SLUG*" | wc -l) + 1 ))
if [ "$NFILES" -gt 8 ]; then record result-files FAILED 0 "$NFILES files in $OUT > 8"; fi
echo
echo "================================================================================"
"$PY" scripts/gpu_image.py summary "$P.md" "$STATUS_TSV" "$P-env.json" "$P-bench.json"
printf '\n%s\n' "$TABLES" >> "$P.md"
echo "results: $(find "$OUT" -maxdepth 1 -type f -name "$SLUG*" | sort | tr '\n' ' ')"
echo "gpu-check ($TIER$([ "$DRY" = 1 ] && echo ', dry run')): $([ "$FAIL" = 0 ] && echo PASSED || echo FAILED)"
exit $FAIL
