"""vLLM on a GPU with the SelfExtend plugin against plain vLLM: same prompts, same card, same ``max_model_len``.

Each workload is ``N x L``: N pass-key prompts of about L tokens (past the model's trained window), all
submitted at once, greedy, ``--new-tokens`` each.  Every prompt opens with its own record line, so no two
share a first KV block: prefix caching is on in both engines (vLLM's default) but nothing is reused
across requests, and what is timed is prefill and decode, not cache hits.  The engines run one after
another, each in its own process (``integrations/vllm/tests/run_engine.py``):

* ``vllm + plugin``: ``vllm.LLM(**vllm_selfextend.engine_args(folder, target_context=max_model_len))``
  (eager: the backend walks the batch on the host, so no CUDA graphs);
* ``vllm + plugin (compiled, piecewise graphs)`` (``--engines plugin-compiled``): ``enforce_eager=False``, so
  vLLM compiles the model and captures CUDA graphs for everything but attention, which runs eagerly between the
  graph pieces (the backend's host loop is allowed there; its KV write has no host sync, so it can be captured);
* ``vllm, plain``: the same folder and ``max_model_len`` with vLLM's own attention (FlashAttention 3 on
  Hopper), its defaults otherwise (torch.compile and CUDA graphs); ``--plain-eager`` adds an eager run.

Reported per workload and engine: seconds from submission to the last answer (start-up excluded), tokens
per second (prompt + generated), the plugin's ratio to plain, and how many pass keys were found.

    PYTHONPATH=. python benchmarks/vllm_gpu.py --out results/vllm_gpu_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNNER = ROOT / "integrations/vllm/tests/run_engine.py"


def parse_workload(text: str) -> tuple[int, int]:
    """``"8x16384"`` -> (8, 16384); says what to write otherwise."""
    try:
        n, length = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"workload {text!r}: write REQUESTSxTOKENS, e.g. 8x16384") from None
    if n < 1 or length < 64:
        raise argparse.ArgumentTypeError(f"workload {text!r}: at least 1 request of 64 tokens")
    return n, length


def run_engine(job: dict, env: dict[str, str], timeout_s: float | None = None) -> dict:
    """One engine over the job in its own process (vLLM wants one engine a process); its RESULT line, or the
    tail of its log as the error.  ``benchmarks/vllm_throughput.py`` runs its engines through this too."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        done = subprocess.run(
            [sys.executable, str(RUNNER), f.name], capture_output=True, text=True, env=env, timeout=timeout_s
        )
    finally:
        os.unlink(f.name)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise RuntimeError(f"engine failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    said = ("SelfExtend attention time", "SelfExtend kernels compiled", "warm-up failed", "attention not used")
    for x in (done.stdout + done.stderr).splitlines():  # SELFEXTEND_VLLM_PROFILE=1's totals, warm-up, fallbacks
        if any(s in x for s in said):
            print(x, flush=True)
    return json.loads(line[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workloads", type=parse_workload, nargs="+", default=[(8, 16384), (32, 16384), (8, 65536)],
        help="REQUESTSxTOKENS, e.g. 32x16384",
    )  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=65536, help="the same for both engines")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=None,
        help="the same for both engines (vLLM's default if unset); a prompt that fits one step is prefilled whole",
    )  # fmt: skip
    parser.add_argument("--no-warmup", action="store_true", help="time the first batch too (Triton JIT included)")
    parser.add_argument("--plain-eager", action="store_true", help="also run plain vLLM without CUDA graphs")
    parser.add_argument(
        "--engines", nargs="+", default=["plugin", "plain"], choices=["plugin", "plugin-compiled", "plain"],
        help="plugin-compiled: enforce_eager=False, the model compiled and CUDA-graphed piecewise around attention",
    )  # fmt: skip
    parser.add_argument("--timeout-s", type=float, default=540.0, help="per engine process")
    parser.add_argument("--out", default="results/vllm_gpu.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from selfextend_llm.loading import export_folder
    from selfextend_llm.tasks.passkey import passkey_prompt

    folder = str(export_folder(None))
    tok = AutoTokenizer.from_pretrained(folder)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    # every prompt leaves room for its answer inside max_model_len
    budget = args.max_model_len - args.new_tokens - 64
    batches, keys, started = [], [], time.perf_counter()
    # an untimed first batch: Triton compiles the plugin's kernels, vLLM warms its own; five prompts, so that one
    # is chunked at 65,536 batched tokens and the chunked-prefill kernel is compiled too
    workloads = list(args.workloads) if args.no_warmup else [(5, min(16384, budget)), *args.workloads]
    for w, (n, length) in enumerate(workloads):
        target = min(length, budget)
        ids, answers = [], []
        for i in range(n):
            prompt = passkey_prompt(target - 24, (i + 0.5) / n, 1000 * w + i, count)
            ids.append(tok(f"Record {w}-{i}-{prompt.passkey[::-1]}.\n" + prompt.text).input_ids[:budget])
            answers.append(prompt.passkey)
        batches.append({"prompts": ids, "max_tokens": args.new_tokens})
        keys.append(answers)
    print(f"prompts ready in {time.perf_counter() - started:.0f} s", flush=True)

    common = {"dtype": args.dtype, "max_num_seqs": max(n for n, _ in args.workloads), "enable_prefix_caching": True}
    if args.max_num_batched_tokens:
        common["max_num_batched_tokens"] = args.max_num_batched_tokens
    window = args.max_model_len
    engines: list[tuple[str, dict]] = []
    if "plugin" in args.engines:
        engines.append(("vllm + plugin", {"plugin": {"model": folder, "target_context": window, **common}}))
    if "plugin-compiled" in args.engines:
        compiled = {"model": folder, "target_context": window, "enforce_eager": False, **common}
        engines.append(("vllm + plugin (compiled, piecewise graphs)", {"plugin": compiled}))
    plain = {"model": folder, "max_model_len": window, "hf_overrides": {"max_position_embeddings": window}, **common}
    if "plain" in args.engines:
        engines.append(("vllm, plain", {"engine": plain}))
        if args.plain_eager:
            engines.append(("vllm, plain (eager)", {"engine": {**plain, "enforce_eager": True}}))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []
    for name, job in engines:
        print(f"{name}: starting", flush=True)
        try:
            result = run_engine({**job, "batches": batches}, env, args.timeout_s)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            print(f"{name}: FAILED\n{err}", flush=True)
            rows.append({"engine": name, "error": str(err)[-4000:]})
            continue
        timed = zip(workloads, batches, result["batches"], keys, strict=True)
        for k, ((n, length), sent, batch, answer) in enumerate(timed):
            if k == 0 and not args.no_warmup:
                continue
            prompt_tokens = sum(len(x) for x in sent["prompts"])
            texts = [o["text"] for o in batch["outputs"]]
            generated = sum(len(o["token_ids"]) for o in batch["outputs"])
            row = {
                "engine": name, "workload": f"{n}x{length}", "requests": n, "prompt_tokens": prompt_tokens,
                "generated_tokens": generated, "seconds": batch["seconds"],
                "tokens_per_s": (prompt_tokens + generated) / batch["seconds"],
                "keys_found": sum(a in t for a, t in zip(answer, texts, strict=True)), "startup_s": result["startup_s"],
                "sample": texts[0][:80],
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(
        f"\n{device}, {args.dtype}, max_model_len {window}, max_num_batched_tokens "
        f"{args.max_num_batched_tokens or 'default'}, {args.new_tokens} new tokens each, prefix caching on\n"
    )
    print("| workload | engine | seconds | tokens/s | vs plain | keys found |\n|---|---|---|---|---|---|")
    plain_rate = {r["workload"]: r["tokens_per_s"] for r in rows if r["engine"] == "vllm, plain" and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"| - | {r['engine']} | failed | | | |")
            continue
        base = plain_rate.get(r["workload"])
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"| {r['workload']} | {r['engine']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {ratio} | "
              f"{r['keys_found']}/{r['requests']} |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": time.strftime("%Y-%m-%d"), "device": device, "dtype": args.dtype, "max_model_len": window,
               "max_num_batched_tokens": args.max_num_batched_tokens, "new_tokens": args.new_tokens,
               "warmup": not args.no_warmup, "rows": rows}  # fmt: skip
    out.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
