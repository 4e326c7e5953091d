# Two entry points for a fresh clone: `make demo` and `make test`. Each bootstraps .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2

.PHONY: demo demo-full test bench gpu-check compat build clean

$(VENV)/.installed: pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# Compile the C++/CUDA extension once (cached under build/ext); the tests then only load it.
build: $(VENV)/.installed
	$(PY) -m atax_kernels.build

# Build first: otherwise the first projection inside a demo worker compiles the extension while the other
# worker trains (correct, but it muddles the demo's timings).
demo: build
	$(PY) -m atax_kernels.demo --json docs/demo.json --markdown docs/demo.md --plot docs/demo.png

# The seeds study (3 split + fine-tuning seeds, every method; ~15-25 min on 2 cores): mean ± std in docs/.
demo-full: build
	$(PY) -m atax_kernels.demo --full --json docs/demo-full.json --markdown docs/demo-full.md --plot docs/demo-full.png

test: build
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) -m atax_kernels.bench --markdown bench/results/cpu.md --json bench/results/cpu.json

# On a bare GPU machine: no venv, no install, no network; system python3 (PYTHON=... overrides).
# GPU_CHECK_ARGS=--quick for the <= 4 min tier, --dry-run to rehearse it without a GPU.
gpu-check:
	PYTHON="$(PYTHON)" bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# The GPU image's versions (Python 3.12, torch 2.11.0, triton 3.6.0) in a second venv, CPU tests only.
compat:
	bash scripts/compat.sh

clean:
	rm -rf build *.egg-info .pytest_cache .hypothesis
