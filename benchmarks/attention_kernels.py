"""One attention layer: SelfExtend vs plain SDPA, checked against the float64 formula and timed.

Prints a table (and writes results/attention_kernels.json): median time of plain causal SDPA and of
SelfExtend at each length, the ratio, peak memory, and the max error against the reference on a
shorter prefix. Runs on CUDA when present, else CPU.

    python benchmarks/attention_kernels.py --lengths 8192 16384 32768 65536
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from selfextend_llm.attention import selfextend_attention
from selfextend_llm.reference import reference_selfextend
from selfextend_llm.rope import rotate


def timed(fn, repeats: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak(fn) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="results/attention_kernels.json")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    d, h, kvh = args.head_dim, args.heads, args.kv_heads
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev).float() / d))
    rows = []
    # exactness on a short prefix, against the float64 formula (lengths not multiples of the block)
    n_chk = 3001
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, h, n_chk, d, device=dev, dtype=dtype, generator=g)
    k = torch.randn(1, kvh, n_chk, d, device=dev, dtype=dtype, generator=g)
    v = torch.randn(1, kvh, n_chk, d, device=dev, dtype=dtype, generator=g)
    pos = torch.arange(n_chk, device=dev)[None]
    q, k = rotate(q, pos, inv), rotate(k, pos, inv)
    out, _ = selfextend_attention(
        q,
        k,
        v,
        query_positions=pos,
        query_start=0,
        group_size=args.group,
        neighbor_window=args.window,
        inv_freq=inv,
        scale=d**-0.5,
        block_size=1000,
    )
    ref = reference_selfextend(
        q,
        k,
        v,
        query_positions=pos,
        key_positions=pos,
        group_size=args.group,
        neighbor_window=args.window,
        inv_freq=inv,
        scale=d**-0.5,
    )
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    print(
        f"device {torch.cuda.get_device_name() if dev == 'cuda' else platform.processor()}; "
        f"relative max error vs float64 formula at n={n_chk}: {err:.2e}"
    )
    print(f"{'tokens':>8} {'plain ms':>10} {'selfextend ms':>14} {'ratio':>6} {'plain MiB':>10} {'SE MiB':>8}")
    for n in args.lengths:
        q = torch.randn(1, h, n, d, device=dev, dtype=dtype)
        k = torch.randn(1, kvh, n, d, device=dev, dtype=dtype)
        v = torch.randn(1, kvh, n, d, device=dev, dtype=dtype)
        pos = torch.arange(n, device=dev)[None]

        def plain(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def se(q=q, k=k, v=v, pos=pos):
            return selfextend_attention(
                q,
                k,
                v,
                query_positions=pos,
                query_start=0,
                group_size=args.group,
                neighbor_window=args.window,
                inv_freq=inv,
                scale=d**-0.5,
                block_size=args.block,
            )[0]

        with torch.inference_mode():
            tp, ts = timed(plain, args.repeats), timed(se, args.repeats)
            mp, ms = peak(plain), peak(se)
        # decoding one token against n cached keys (grouped keys already cached, as in generation)
        q1, p1 = q[:, :, -1:], pos[:, -1:]
        with torch.inference_mode():
            _, cache = selfextend_attention(
                q[:, :, -2:-1],
                k[:, :, : n - 1],
                v[:, :, : n - 1],
                query_positions=pos[:, -2:-1],
                query_start=n - 2,
                group_size=args.group,
                neighbor_window=args.window,
                inv_freq=inv,
                scale=d**-0.5,
            )

        def plain_dec(q1=q1, k=k, v=v):
            return F.scaled_dot_product_attention(q1, k, v, enable_gqa=True)

        def se_dec(q1=q1, k=k, v=v, p1=p1, cache=cache, n=n):
            return selfextend_attention(
                q1,
                k,
                v,
                query_positions=p1,
                query_start=n - 1,
                group_size=args.group,
                neighbor_window=args.window,
                inv_freq=inv,
                scale=d**-0.5,
                key_cache=cache,
            )[0]

        with torch.inference_mode():
            dp, ds = timed(plain_dec, args.repeats * 4), timed(se_dec, args.repeats * 4)
        print(f"{'':>8} decode: plain {dp * 1e3:.3f} ms, selfextend {ds * 1e3:.3f} ms, ratio {ds / dp:.2f}", flush=True)
        rows.append(
            {
                "decode_plain_ms": dp * 1e3,
                "decode_selfextend_ms": ds * 1e3,
                "decode_ratio": ds / dp,
                "tokens": n,
                "plain_ms": tp * 1e3,
                "selfextend_ms": ts * 1e3,
                "ratio": ts / tp,
                "plain_peak_mib": mp,
                "selfextend_peak_mib": ms,
            }
        )
        print(f"{n:>8} {tp * 1e3:>10.2f} {ts * 1e3:>14.2f} {ts / tp:>6.2f} {mp:>10.0f} {ms:>8.0f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor(),
                "dtype": str(dtype),
                "heads": h,
                "kv_heads": kvh,
                "head_dim": d,
                "group": args.group,
                "window": args.window,
                "relative_error": err,
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
