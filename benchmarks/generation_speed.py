"""Generation speed end to end: plain vs SelfExtend, dynamic (eager) vs static cache (compiled).

For each prompt length, on one model in one process, each setting runs ``model.generate``
greedily: a first call (compilation included, reported apart), then the steady state: time to
first token (``max_new_tokens=1``) and decode tokens/s over ``--new-tokens`` forced tokens
(``min_new_tokens``).  Lengths are chosen so that prompt + new tokens fill a cache bucket exactly.
Ratios are SelfExtend / plain of the same cache kind, measured in the same run.

    python benchmarks/generation_speed.py --lengths 16256 32640 65408 --dtype bfloat16   # GPU
    python benchmarks/generation_speed.py --lengths 1920 7936 --new-tokens 32             # CPU

Writes results/generation_speed_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import selfextend_llm
from selfextend_llm.tasks.passkey import passkey_prompt
from selfextend_llm.tuning import choose_config

SETTINGS = (
    "plain/dynamic", "selfextend/dynamic", "plain/static", "selfextend/static", "plain/static-eager",
    "selfextend/static-eager",
)  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def run_setting(se, ids: torch.Tensor, setting: str, new_tokens: int, skip_dynamic_steady: bool) -> dict:
    method, cache = setting.split("/")
    lm, device = se.model, se.device
    n = ids.shape[1]
    selfextend_llm.remove(lm)
    if method == "selfextend":
        config = choose_config(se.model_name, se.pretrained_context, n + new_tokens)
        config = config or selfextend_llm.SelfExtendConfig.for_target(se.pretrained_context, n + new_tokens)
        selfextend_llm.apply(lm, config)
    se.fast.enabled, se.fast.failed = cache.startswith("static"), None
    se.fast.compile = cache == "static"
    base = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=se.tokenizer.pad_token_id)

    def generate(count: int) -> torch.Tensor:
        extra = se.fast.generate_kwargs(1, n + new_tokens)
        with torch.inference_mode():
            return lm.generate(ids, max_new_tokens=count, min_new_tokens=count, **base, **extra)

    first, out = _timed(lambda: generate(new_tokens), device)
    row = {"first_call_s": first, "tokens": out[0, n:].tolist()}
    if cache == "dynamic" and skip_dynamic_steady:
        row.update(ttft_s=None, decode_tok_s=(new_tokens - 1) / first)  # first call is steady for eager
    else:
        ttft, _ = _timed(lambda: generate(1), device)
        total, _ = _timed(lambda: generate(new_tokens), device)
        row.update(ttft_s=ttft, decode_tok_s=(new_tokens - 1) / max(total - ttft, 1e-9))
    if se.fast.failed:
        row["fallback"] = se.fast.failed
    if selfextend_llm.is_applied(lm):
        selfextend_llm.clear_cache(lm)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--gguf-file")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1920, 7936])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS[:4]), choices=SETTINGS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    se = selfextend_llm.load(args.model, gguf_file=args.gguf_file, dtype=args.dtype, target_context=131072)
    device = se.device
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    rows = []
    header = f"{'tokens':>7} {'setting':>19} {'first call':>11} {'TTFT':>8} {'decode':>12} {'same tokens':>12}"
    print(f"{name}, {se.model_name}, {next(lm_p.dtype for lm_p in se.model.parameters())}\n{header}", flush=True)
    for n in args.lengths:
        text = passkey_prompt(n + 64, 0.5, 0, se.count_tokens).text
        ids = torch.tensor([se.encode(text)[:n]], device=device)
        got = {}
        for setting in args.settings:
            got[setting] = run_setting(se, ids, setting, args.new_tokens, skip_dynamic_steady=device.type == "cuda")
            r = got[setting]
            twin = got.get(setting.replace("static-eager", "dynamic").replace("static", "dynamic"))
            same = "" if twin is None or twin is r else f"{_agreement(r['tokens'], twin['tokens']):.2f}"
            ttft = "-" if r["ttft_s"] is None else f"{r['ttft_s']:.3f} s"
            print(
                f"{n:>7} {setting:>19} {r['first_call_s']:>9.1f} s {ttft:>8} {r['decode_tok_s']:>8.1f} t/s {same:>12}",
                flush=True,
            )
        row = {"tokens": n, "settings": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in got.items()}}
        for cache in ("dynamic", "static", "static-eager"):
            p, s = got.get(f"plain/{cache}"), got.get(f"selfextend/{cache}")
            if p and s:
                row[f"decode_ratio_{cache}"] = s["decode_tok_s"] / p["decode_tok_s"]
        if "selfextend/static" in got and "plain/static" in got:
            print(f"{'':>7} SelfExtend static decode = {row['decode_ratio_static']:.2f}x plain static", flush=True)
        rows.append(row)
    kind = "cuda" if device.type == "cuda" else "cpu"
    out = Path(args.out or f"results/generation_speed_{kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"device": name, "model": se.model_name, "new_tokens": args.new_tokens, "date": time.strftime("%Y-%m-%d"),
             "rows": rows},
            indent=2,
        )
    )  # fmt: skip
    print(f"wrote {out}")


def _agreement(a: list[int], b: list[int]) -> float:
    """Fraction of greedy tokens that agree, up to the first difference (1.0 = identical)."""
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return same / max(len(a), 1)


if __name__ == "__main__":
    main()
