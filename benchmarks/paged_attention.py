"""SelfExtend over a paged KV cache (the vLLM backend's path): what the gather costs, on a GPU.

For each shape and length the cache is split into shuffled 16-token blocks, as vLLM keeps it, and four
things are timed (CUDA events through ``triton.testing.do_bench``, median):

* ``gather``: copying each sequence's blocks into contiguous keys and values (the first version's extra);
* ``kernel``: SelfExtend on those contiguous keys (the project's Triton kernels);
* ``paged``: the whole :func:`selfextend_llm.kernels.paged.paged_selfextend_attention` call;
* ``plain``: plain attention on the same contiguous keys (SDPA, GQA native, bottom-right causal for a chunk):
  the best a plain backend does on this GPU.

Cases: a decode step of 8 sequences (one query each) and a 512-token prefill chunk at the end of one
sequence, at 16k / 32k / 64k keys, for SmolLM2-135M's shape (9 query / 3 KV heads, d 64) and an 8B-class
shape (32 / 8, d 128), bf16.

    python benchmarks/paged_attention.py            # writes results/paged_attention_<gpu>.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from selfextend_llm.attention import selfextend_attention
from selfextend_llm.config import SelfExtendConfig
from selfextend_llm.kernels.paged import gather_sequence, paged_selfextend_attention, split_kv

SHAPES = {"SmolLM2-135M (9/3 heads, d64)": (9, 3, 64), "8B-class (32/8 heads, d128)": (32, 8, 128)}
BLOCK = 16


def _timer(device: torch.device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")

    def wall(fn):  # CPU: wall clock, milliseconds
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return wall


def _cache(n_seqs: int, n: int, kv_heads: int, d: int, dtype, device):
    blocks_per = (n + BLOCK - 1) // BLOCK
    total = n_seqs * blocks_per
    cache = torch.randn(total, kv_heads, BLOCK, 2 * d, dtype=dtype, device=device)
    order = torch.randperm(total, device=device).int()
    table = order.view(n_seqs, blocks_per)
    return cache, table


def run_case(shape: tuple[int, int, int], n: int, q_len: int, n_seqs: int, device, dtype, bench) -> dict:
    heads, kv_heads, d = shape
    cache, table = _cache(n_seqs, n, kv_heads, d, dtype, device)
    query = torch.randn(n_seqs * q_len, heads, d, dtype=dtype, device=device)
    inv = (1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float().to(device)
    cfg = SelfExtendConfig(8, 2048)
    seq_lens, starts = [n] * n_seqs, [i * q_len for i in range(n_seqs + 1)]
    key_cache, value_cache = split_kv(cache, d)
    scale = d**-0.5
    pos = torch.arange(n - q_len, n, device=device)[None]

    def gather():
        return [(gather_sequence(key_cache, table[i], n), gather_sequence(value_cache, table[i], n)) for i in
                range(n_seqs)]  # fmt: skip

    kv = gather()

    def kernel():
        for i, (k, v) in enumerate(kv):
            q = query[starts[i] : starts[i + 1]].transpose(0, 1).unsqueeze(0)
            selfextend_attention(
                q, k, v, query_positions=pos, query_start=n - q_len, group_size=cfg.group_size,
                neighbor_window=cfg.neighbor_window, inv_freq=inv, scale=scale,
            )  # fmt: skip

    def paged():
        paged_selfextend_attention(
            query, cache, block_table=table, seq_lens=seq_lens, query_start_loc=starts, config_for=lambda _: cfg,
            inv_freq=inv, scale=scale, pretrained_context=8192,
        )  # fmt: skip

    from torch.nn.attention.bias import causal_lower_right

    def plain():
        for i, (k, v) in enumerate(kv):
            q = query[starts[i] : starts[i + 1]].transpose(0, 1).unsqueeze(0)
            mask = None if q_len == 1 else causal_lower_right(q_len, n)
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    row = {"gather_ms": bench(gather), "kernel_ms": bench(kernel), "paged_ms": bench(paged), "plain_ms": bench(plain)}
    row["gather_share"] = row["gather_ms"] / row["paged_ms"]
    row["paged_vs_kernel"] = row["paged_ms"] / row["kernel_ms"]
    row["paged_vs_plain"] = row["paged_ms"] / row["plain_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16_384, 32_768, 65_536])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    bench = _timer(device)
    rows = []
    for name, shape in SHAPES.items():
        for n in args.lengths:
            for case, q_len, n_seqs in (("decode, 8 sequences", 1, 8), ("prefill chunk of 512", 512, 1)):
                row = {
                    "shape": name,
                    "keys": n,
                    "case": case,
                    **run_case(shape, n, q_len, n_seqs, device, dtype, bench),
                }
                rows.append(row)
                print(
                    f"{name:32s} {n:>6} {case:22s} gather {row['gather_ms']:.3f} kernel {row['kernel_ms']:.3f} "
                    f"paged {row['paged_ms']:.3f} plain {row['plain_ms']:.3f} ms",
                    flush=True,
                )
    print("\n| shape | keys | case | gather ms | SelfExtend kernel ms | paged total ms | plain SDPA ms | gather share "
          "| paged / kernel | paged / plain |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['keys']} | {r['case']} | {r['gather_ms']:.3f} | {r['kernel_ms']:.3f} | "
            f"{r['paged_ms']:.3f} | {r['plain_ms']:.3f} | {r['gather_share']:.0%} | {r['paged_vs_kernel']:.2f}x | "
            f"{r['paged_vs_plain']:.2f}x |"
        )
    tag = gpu.replace("NVIDIA ", "").split()[0].lower() if device.type == "cuda" else "cpu"
    out = Path(args.out or f"results/paged_attention_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": gpu, "dtype": str(dtype), "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
