# Two entry points for a fresh clone: `make demo` and `make test`. Each bootstraps .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2

.PHONY: demo test bench gpu-check build clean

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
	$(PY) -m atax_kernels.demo --json docs/demo.json --markdown docs/demo.md --plot docs/pareto.png

test: build
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) -m atax_kernels.bench --markdown bench/results/cpu.md --json bench/results/cpu.json

gpu-check: $(VENV)/.installed
	bash scripts/gpu_check.sh

clean:
	rm -rf build *.egg-info .pytest_cache .hypothesis
