"""End to end on a real model: prefill, decode and peak memory, plain vs SelfExtend, eager vs fast path.

Eight settings per length, each in a fresh process so that its peak memory is its own: ``plain/eager``,
``selfextend/eager`` (``generate`` over transformers' dynamic cache), ``plain/fast``,
``selfextend/fast`` (:class:`selfextend_llm.generation.FastGeneration`, a static cache sized in buckets,
compiled steps on a GPU; fp32 weights), ``plain/quantized``, ``selfextend/quantized`` (the shipped CPU
path for a GGUF file: the fast path over the file's own 4-/8-bit blocks,
:mod:`selfextend_llm.hf.quantized`, with the C kernels of :mod:`selfextend_llm.kernels.native`) and
``*/quantized-layers`` (the same with transformers' eager layers around the C attention and products:
the whole-step C call of :mod:`selfextend_llm.hf.native_step` off) and ``*/quantized-torch`` (every C
kernel off). SelfExtend runs the setting the model's table
gives that length. One greedy ``generate`` per setting: a logits processor stamps the time of every
step, so prefill is the time to the first step and decode the time between the first and the last.
Ratios are SelfExtend / plain of the same path in the same run; the greedy tokens of every setting are
compared with ``plain/eager`` (inside the window) and ``selfextend/eager``.
Writes results/speed_memory_<device>.json and prints a table.

    python benchmarks/speed_memory.py --lengths 8192 16384 32768          # CPU, embedded default
    python benchmarks/speed_memory.py --gguf-file model.gguf --lengths 8192 32768   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from generation_speed import _agreement  # the same token comparison as the generation benchmark

import selfextend_llm
from selfextend_llm.hf import native_step
from selfextend_llm.kernels import native
from selfextend_llm.tasks.passkey import passkey_prompt

SETTINGS = (
    "plain/eager", "selfextend/eager", "plain/fast", "selfextend/fast", "plain/quantized-torch",
    "selfextend/quantized-torch", "plain/quantized-layers", "selfextend/quantized-layers", "plain/quantized",
    "selfextend/quantized",
)  # fmt: skip
#: ``*/quantized-torch``: the quantised path with the C kernels switched off (PyTorch and Inductor only).
NO_C_KERNELS = {"SELFEXTEND_NATIVE_KERNELS": "0"}


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark, MiB


class _Stamps:
    """A logits processor that records when each decoding step reaches it (after its forward pass)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def run_one(se, ids: torch.Tensor, new_tokens: int) -> dict:
    """One greedy generate of ``new_tokens`` forced tokens: prefill s, decode tok/s, peak MiB, the tokens."""
    from transformers import LogitsProcessorList

    device = ids.device
    stamps = _Stamps(device)
    extra = se.fast.generate_kwargs(1, ids.shape[1] + new_tokens)
    base = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=se.tokenizer.pad_token_id)
    _peak_reset(device)
    with torch.inference_mode():
        start = time.perf_counter()
        out = se.model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            logits_processor=LogitsProcessorList([stamps]), **base, **extra,
        )  # fmt: skip
    prefill = stamps.times[0] - start
    decode = (new_tokens - 1) / max(stamps.times[-1] - stamps.times[0], 1e-9)
    return {
        "prefill_s": prefill,
        "prefill_tok_s": ids.shape[1] / prefill,
        "decode_tok_s": decode,
        "peak_mib": _peak(device),
        "tokens": out[0, ids.shape[1] :].tolist(),
    }


def measure(args, n: int, setting: str) -> dict:
    """One setting in this process: load, (warm up on GPU,) time one generate."""
    method, path = setting.split("/")
    se = selfextend_llm.load(
        args.model, gguf_file=args.gguf_file, dtype=args.dtype, target_context=max(131_072, max(args.lengths) * 2),
        quantized_weights=path.startswith("quantized"),
    )  # fmt: skip
    lm, device = se.model, se.device
    text = passkey_prompt(n + 64, 0.5, 0, se.count_tokens).text
    ids = torch.tensor([se.encode(text)[:n]], device=device)
    config = se.plan.config_for(n + args.decode_tokens)
    selfextend_llm.remove(lm)
    if method == "selfextend" and config is not None:
        selfextend_llm.apply(lm, config)
    se.fast.enabled, se.fast.failed = path != "eager", None
    if path == "quantized-layers":
        native_step.uninstall(lm)
    if device.type == "cuda":  # warm-up: kernel selection and compilation are not what we time
        run_one(se, ids, 4)
    row = run_one(se, ids, args.decode_tokens)
    row["setting"] = "plain" if method == "plain" or config is None else config.label
    row["fallback"] = se.fast.failed
    row["device"] = (
        torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    )
    row["model"] = se.model_name
    row["quantized_weights"] = se.describe()["quantized_weights"]
    row["native_kernels"] = native.describe()
    runner = getattr(lm, "_selfextend_native", None)
    row["native_steps"] = None if runner is None else runner.steps
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--gguf-file")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, metavar=("LENGTH", "SETTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args, int(args.child[0]), args.child[1])), flush=True)
        return
    rows, name, model = [], "?", "?"
    print(
        f"{'tokens':>7} {'setting':>17} {'grouping':>15} {'prefill':>9} {'prefill x':>9} {'decode':>11} "
        f"{'decode x':>8} {'vs plain eager':>14} {'peak MiB':>9} {'same tokens':>11}",
        flush=True,
    )
    for n in args.lengths:
        got, runs = {}, []  # the latest row of each setting (for ratios), and every row in order
        for setting in args.settings:
            method, path = setting.split("/")
            cmd = [sys.executable, __file__, "--child", str(n), setting, "--lengths", *map(str, args.lengths)]
            cmd += ["--decode-tokens", str(args.decode_tokens)]
            for flag in ("model", "gguf_file", "dtype"):
                if getattr(args, flag):
                    cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            env = {**os.environ, **(NO_C_KERNELS if path == "quantized-torch" else {})}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            got[setting] = r = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            r["run"] = setting
            runs.append(r)
            name, model = r["device"], r["model"]
            twin = got.get(f"plain/{path}") if method == "selfextend" else None
            ref = got.get(f"{method}/eager")
            r["same_tokens_as_eager"] = None if ref is None or ref is r else _agreement(r["tokens"], ref["tokens"])
            r["prefill_ratio"] = None if twin is None else r["prefill_s"] / twin["prefill_s"]
            r["decode_ratio"] = None if twin is None else twin["decode_tok_s"] / r["decode_tok_s"]
            base = got.get("plain/eager")
            r["decode_vs_plain_eager"] = None if base is None else r["decode_tok_s"] / base["decode_tok_s"]
            same = "" if r["same_tokens_as_eager"] is None else f"{r['same_tokens_as_eager']:.2f}"
            px = "" if twin is None else f"{r['prefill_ratio']:.2f}x"
            dx = "" if twin is None else f"{r['decode_ratio']:.2f}x"
            vx = "" if r["decode_vs_plain_eager"] is None else f"{r['decode_vs_plain_eager']:.2f}x"
            print(
                f"{n:>7} {setting:>17} {r['setting']:>15} {r['prefill_s']:>7.1f} s {px:>9} "
                f"{r['decode_tok_s']:>7.1f} t/s {dx:>8} {vx:>14} {r['peak_mib']:>9.0f} {same:>11}",
                flush=True,
            )
        rows.append({"tokens": n, "settings": got, "runs": runs})
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out or f"results/speed_memory_{kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": name, "model": model, "date": time.strftime("%Y-%m-%d"), "decode_tokens": args.decode_tokens}
    out.write_text(json.dumps({**meta, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
