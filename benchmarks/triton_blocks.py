"""Sweep the Triton kernels' launch settings on the GPU at one length.

    python benchmarks/triton_blocks.py --kernel prefill --tokens 32768 --head-dim 128
    python benchmarks/triton_blocks.py --kernel split --tokens 8192 --head-dim 64 --heads 9 --kv-heads 3
    python benchmarks/triton_blocks.py --kernel decode --tokens 65536

Prints the median time of each configuration next to plain SDPA (decode: GPU time from CUDA
graphs).  The defaults in ``selfextend_llm.kernels.triton.utils`` (``_prefill_blocks``, the
arguments of ``decode``) come from these sweeps.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from selfextend_llm.kernels import triton as tk
from selfextend_llm.rope import rotate


def bench(fn, repeats: int = 7) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def sweep_decode(q, k, v, inv, d) -> None:
    """Split-K decoding: programs per SM, pipeline stages, key block, warps, hardware trig."""
    from attention_kernels import graph_timed  # same folder

    q1 = q[:, :, -1:]
    plain = graph_timed(lambda: F.scaled_dot_product_attention(q1, k, v, enable_gqa=True), 9) * 1e3
    print(f"plain SDPA decode {plain * 1e3:.1f} us (GPU) at n={k.shape[2]}, d={d}")
    base = dict(offsets=torch.zeros(1, dtype=torch.long, device="cuda"), group_size=4, neighbor_window=1024)
    base.update(inv_freq=inv, scale=d**-0.5)
    settings = [dict(fast_trig=False), {}]
    settings += [dict(programs_per_sm=p) for p in (2, 8)] + [dict(num_stages=s) for s in (2, 4)]
    settings += [dict(block_n=b) for b in (32, 128)] + [dict(num_warps=8)]
    settings += [dict(programs_per_sm=8, blocks_per_split=b) for b in (1, 2)]
    for extra in settings:
        ms = graph_timed(lambda extra=extra: tk.decode(q1, k, v, **base, **extra), 9) * 1e3
        print(f"{extra or 'defaults'}: {ms * 1e3:.1f} us ({ms / plain:.2f}x)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", choices=["prefill", "split", "decode"], default="prefill")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    n, h, kvh, d = args.tokens, args.heads, args.kv_heads, args.head_dim
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    pos = torch.arange(n, device="cuda")[None]
    q = rotate(torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16), pos, inv)
    k = rotate(torch.randn(1, kvh, n, d, device="cuda", dtype=torch.bfloat16), pos, inv)
    v = torch.randn(1, kvh, n, d, device="cuda", dtype=torch.bfloat16)
    plain = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    print(f"plain SDPA {plain:.2f} ms at n={n}, d={d}")
    if args.kernel == "decode":
        return sweep_decode(q, k, v, inv, d)
    off = torch.zeros(1, dtype=torch.int32, device="cuda")
    kg = tk.rotate_keys_to_groups(k, off, 4, inv)
    common = dict(offsets=off, group_size=4, neighbor_window=1024, inv_freq=inv, scale=d**-0.5)
    if args.kernel == "split":
        kernel = lambda **blocks: tk.prefill_split(q, k, v, **common, **blocks)  # noqa: E731
    else:
        kernel = lambda **blocks: tk.prefill(q, k, v, kg, query_start=0, **common, **blocks)  # noqa: E731
    results = []
    for bm, bn, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)):
        if bm * bn * d > 128 * 64 * 128 or (bm == 64 and warps == 8):
            continue
        try:
            ms = bench(
                lambda bm=bm, bn=bn, warps=warps, stages=stages: kernel(
                    block_m=bm, block_n=bn, num_warps=warps, num_stages=stages
                )
            )
        except Exception as err:  # out of shared memory, etc.
            print(f"BM={bm} BN={bn} warps={warps} stages={stages}: {type(err).__name__}")
            continue
        results.append((ms, bm, bn, warps, stages))
        print(f"BM={bm:>3} BN={bn:>3} warps={warps} stages={stages}: {ms:.2f} ms ({ms / plain:.2f}x)", flush=True)
    best = min(results)
    print(
        f"best: BM={best[1]} BN={best[2]} warps={best[3]} stages={best[4]}: {best[0]:.2f} ms ({best[0] / plain:.2f}x)"
    )


if __name__ == "__main__":
    main()
