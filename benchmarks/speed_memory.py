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
import subprocess
import sys
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


def measure(args, n: int, method: str) -> dict:
    """One setting in this process: load, (warm up on GPU,) time prefill and decode."""
    se = selfextend_llm.load(args.model, gguf_file=args.gguf_file, dtype=args.dtype, target_context=max(args.lengths))
    lm, device = se.model, se.device
    text = passkey_prompt(n, 0.5, 0, se.count_tokens).text
    ids = torch.tensor([se.encode(text)[:n]], device=device)
    selfextend_llm.remove(lm)
    if method == "selfextend":
        selfextend_llm.apply(lm, selfextend_llm.SelfExtendConfig.for_target(se.pretrained_context, n))
    if device.type == "cuda":  # warm-up: kernel selection and compilation are not what we time
        run_one(lm, ids, 2)
    row = run_one(lm, ids, args.decode_tokens)
    row["device"] = (
        torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    )
    row["model"] = se.model_name
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--gguf-file")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, metavar=("LENGTH", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args, int(args.child[0]), args.child[1])), flush=True)
        return
    rows, name, model = [], "?", "?"
    print(
        f"{'tokens':>7} {'plain prefill':>14} {'SE prefill':>11} {'ratio':>6} {'plain decode':>13} {'SE decode':>10} "
        f"{'ratio':>6} {'plain MiB':>10} {'SE MiB':>8}"
    )
    for n in args.lengths:
        got = {}
        for method in ("plain", "selfextend"):
            # each setting in a fresh process, so that peak memory is its own
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(n),
                method,
                "--lengths",
                *map(str, args.lengths),
                "--decode-tokens",
                str(args.decode_tokens),
            ]
            for flag in ("model", "gguf_file", "dtype"):
                if getattr(args, flag):
                    cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            got[method] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        plain, ext = got["plain"], got["selfextend"]
        name, model = plain["device"], plain["model"]
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
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out or f"results/speed_memory_{kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"device": name, "model": model, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
