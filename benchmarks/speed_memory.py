"""End to end on a real model: prefill and decode speed and peak memory, plain vs SelfExtend.

Both are measured in the same run on the same prompt (pass-key filler) at each length; ratios
are SelfExtend / plain. Writes results/speed_memory_<device>.json and prints a table.

    python benchmarks/speed_memory.py --lengths 4096 8192 16384          # CPU, embedded default
    python benchmarks/speed_memory.py --gguf-file model.gguf --lengths 8192 32768   # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

import selfextend_llm
from selfextend_llm.tasks.passkey import passkey_prompt


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark, MiB


def run_one(model, ids: torch.Tensor, decode_tokens: int) -> dict:
    device = ids.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    _peak_reset(device)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        sync()
        prefill = time.perf_counter() - start
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        sync()
        decode = time.perf_counter() - start
    return {"prefill_tok_s": ids.shape[1] / prefill, "decode_tok_s": decode_tokens / decode, "peak_mib": _peak(device)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--gguf-file")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    se = selfextend_llm.load(args.model, gguf_file=args.gguf_file, dtype=args.dtype, target_context=max(args.lengths))
    lm, device = se.model, se.device
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    rows = []
    print(f"{se!r} on {name}")
    print(
        f"{'tokens':>7} {'plain prefill':>14} {'SE prefill':>11} {'ratio':>6} {'plain decode':>13} {'SE decode':>10} "
        f"{'ratio':>6} {'plain MiB':>10} {'SE MiB':>8}"
    )
    for n in args.lengths:
        text = passkey_prompt(n, 0.5, 0, se.count_tokens).text
        ids = torch.tensor([se.encode(text)[:n]], device=device)
        selfextend_llm.remove(lm)
        if device.type == "cuda":  # warm-up: kernel selection and compilation are not what we time
            run_one(lm, ids, 2)
        plain = run_one(lm, ids, args.decode_tokens)
        selfextend_llm.apply(lm, selfextend_llm.SelfExtendConfig.for_target(se.pretrained_context, n))
        if device.type == "cuda":
            run_one(lm, ids, 2)
        ext = run_one(lm, ids, args.decode_tokens)
        selfextend_llm.clear_cache(lm)
        row = {
            "tokens": n,
            "plain": plain,
            "selfextend": ext,
            "prefill_ratio": plain["prefill_tok_s"] / ext["prefill_tok_s"],
            "decode_ratio": plain["decode_tok_s"] / ext["decode_tok_s"],
            "memory_ratio": ext["peak_mib"] / plain["peak_mib"],
        }
        rows.append(row)
        print(
            f"{n:>7} {plain['prefill_tok_s']:>10.0f} t/s {ext['prefill_tok_s']:>7.0f} t/s {row['prefill_ratio']:>6.2f} "
            f"{plain['decode_tok_s']:>9.1f} t/s {ext['decode_tok_s']:>6.1f} t/s {row['decode_ratio']:>6.2f} "
            f"{plain['peak_mib']:>10.0f} {ext['peak_mib']:>8.0f}",
            flush=True,
        )
    out = Path(args.out or f"results/speed_memory_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"device": name, "model": se.model_name, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
