"""vLLM with the SelfExtend plugin against the project's own server engine, same prompts, same CPU.

The prompts are pass-key prompts of mixed lengths (some past the trained 8k window), all submitted at
once, greedy, ``--new-tokens`` each.  Three engines, one after another on this machine:

* ``vllm + plugin``: ``vllm.LLM(**vllm_selfextend.engine_args(...))`` (in a subprocess, as vLLM wants);
* ``vllm, plain``: the same engine without the plugin (same ``max_model_len``), for reference;
* ``selfextend server engine``: the continuous batcher behind ``selfextend-llm serve``
  (``SelfExtendModel.batcher()``), in-process, so HTTP costs are left out of both sides.

Reported: wall seconds from submission to the last answer (engine start-up excluded), tokens per second
(prompt + generated), and how many keys were found.  Run it in the vLLM environment
(``.venv-vllm/bin/python benchmarks/vllm_throughput.py``); writes ``results/vllm_throughput_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from vllm_gpu import run_engine  # this folder is on sys.path when a script in it runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 3000, 4000, 6000, 9000])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--window", type=int, default=16384)
    parser.add_argument("--out", default="results/vllm_throughput_cpu.json")
    args = parser.parse_args()

    import selfextend_llm
    from selfextend_llm.loading import export_folder
    from selfextend_llm.tasks.passkey import passkey_prompt

    folder = str(export_folder(None))
    model = selfextend_llm.load(target_context=args.window, device="cpu")
    prompts = [passkey_prompt(n, 0.3, 100 + i, model.count_tokens) for i, n in enumerate(args.lengths)]
    ids = [model.tokenize(p.text) for p in prompts]
    prompt_tokens = sum(len(x) for x in ids)
    common = {"dtype": "float32", "kv_cache_memory_bytes": 4 << 30, "max_num_seqs": len(ids)}
    rows = []

    def record(name: str, seconds: float, texts: list[str]) -> None:
        found = sum(p.passkey in t for p, t in zip(prompts, texts, strict=True))
        total = prompt_tokens + args.new_tokens * len(ids)
        rows.append({"engine": name, "seconds": seconds, "tokens_per_s": total / seconds, "keys_found": found,
                     "requests": len(ids)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    batch = [{"prompts": ids, "max_tokens": args.new_tokens}]
    plain = {"model": folder, "max_model_len": args.window, "enforce_eager": True,
             "hf_overrides": {"max_position_embeddings": args.window}, **common}  # fmt: skip
    for name, job in (
        ("vllm + plugin", {"plugin": {"model": folder, "target_context": args.window, **common}, "batches": batch}),
        ("vllm, plain", {"engine": plain, "batches": batch}),
    ):
        try:
            result = run_engine(job, {**os.environ, "HF_HUB_OFFLINE": "1"})["batches"][0]
        except RuntimeError as err:
            raise SystemExit(str(err)) from None
        record(name, result["seconds"], [o["text"] for o in result["outputs"]])

    batcher = model.batcher()
    start = time.perf_counter()
    handles = [batcher.submit(p.text, max_new_tokens=args.new_tokens) for p in prompts]
    texts = ["".join(c.text for c in h) for h in handles]
    record("selfextend server engine (continuous batching)", time.perf_counter() - start, texts)
    batcher.close()

    print(f"\n{platform.processor() or 'CPU'}, {os.cpu_count()} cores, fp32, {len(ids)} requests "
          f"({prompt_tokens} prompt tokens, {min(len(x) for x in ids)}-{max(len(x) for x in ids)}), "
          f"{args.new_tokens} new tokens each\n")  # fmt: skip
    print("| engine | seconds | tokens/s | keys found |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {r['keys_found']}/{r['requests']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d"), "prompt_tokens": prompt_tokens, "rows": rows}, indent=1)
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
