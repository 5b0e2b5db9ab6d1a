#!/usr/bin/env bash
# What is waiting for a GPU, in order of the issues' priority: `bash benchmarks/gpu_queue.sh <step>` on a warm
# machine after the carries (32a/32b: .gpu-m1 and .gpu-m2, see gpu_model_env.sh; 35: the vLLM bundle, see
# gpu_vllm_env.sh; 34: the model).  Each step fits one `device` call (< 600 s) and writes under $OUT.
set -u
step=${1:?"which step: 32a (TTFT, many shapes), 32b (32 mixed requests), 35 (vLLM varlen), 34 (tuning)"}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
case $step in
32a)  # issue 32: TTFT at 16k / 64k with the text encoded in pieces; 20 shapes with cache lengths symbolic
  source benchmarks/gpu_model_env.sh >/dev/null 2>&1
  timeout 170 python3 benchmarks/ttft_product_path.py --lengths 16384 65536 --repeats 3 --dtype bfloat16 \
    --out "$OUT/ttft.json" > "$OUT/ttft.txt" 2>&1; echo "ttft rc=$?"; grep -v Warn "$OUT/ttft.txt" | tail -6
  tok=$(dirname "$(find /tmp/secache -name tokenizer.json | head -1)")
  timeout 200 python3 benchmarks/gpu_many_shapes.py --tokenizer "$tok" --out "$OUT/many_shapes.json" \
    > "$OUT/many.txt" 2>&1; echo "many rc=$?"; grep -v Warn "$OUT/many.txt" | tail -28 ;;
32b)  # issue 32: 32 mixed 1.7k-8k requests batched against the fast path one after another (target >= 4x)
  source benchmarks/gpu_model_env.sh >/dev/null 2>&1
  timeout 500 python3 benchmarks/server_load.py --via direct --clients 32 --requests 32 --short-tokens 1700 8000 \
    --long-tokens 0 --modes batched --out "$OUT/server_load.json" > "$OUT/server_load.txt" 2>&1
  echo "load rc=$?"; grep -v Warn "$OUT/server_load.txt" | tail -15 ;;
35)  # issue 35: paged tests on the GPU, the varlen stages, vLLM end to end against plain vLLM
  source benchmarks/gpu_vllm_env.sh >/dev/null 2>&1; export PYTHONPATH="$PYTHONPATH:$PWD/benchmarks"
  SELFEXTEND_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_paged.py \
    > "$OUT/pytest_paged.txt" 2>&1; echo "pytest rc=$?"; tail -3 "$OUT/pytest_paged.txt"
  timeout 120 python3 benchmarks/grouped_part_kernels.py --repeats 5 --out "$OUT/grouped_part_kernels.json" \
    > "$OUT/gpk.txt" 2>&1; echo "gpk rc=$?"; tail -25 "$OUT/gpk.txt"
  timeout 300 python3 benchmarks/vllm_gpu.py --engines plugin-compiled plain --max-num-batched-tokens 65536 \
    --timeout-s 140 --out "$OUT/vllm_gpu_varlen.json" > "$OUT/vllm_gpu.txt" 2>&1
  echo "vllm rc=$?"; grep -v INFO "$OUT/vllm_gpu.txt" | tail -30 ;;
34)  # issue 34: the families' search at 16k and 32k, resuming round 9's journal (copy results/tune/round9 first)
  source benchmarks/gpu_model_env.sh >/dev/null 2>&1
  cp -r results/tune/round9 "$OUT/round9"
  timeout 560 python3 benchmarks/tune_families.py --device cuda --out-dir "$OUT/round9" --lengths 16384 32768 \
    --deadline-s 420 > "$OUT/tune.txt" 2>&1; echo "tune rc=$?"; tail -30 "$OUT/tune.txt" ;;
*) echo "unknown step $step"; exit 2 ;;
esac
