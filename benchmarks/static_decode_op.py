"""One attention layer, one decode step over a static cache: SelfExtend's step vs plain SDPA.

Both are compiled (``torch.compile``) and replayed from a CUDA graph, as a compiled ``generate``
runs them; GPU time per step from CUDA events over many replays.  Baselines: transformers' own
plain static-cache step (K/V repeated per query head, SDPA with the boolean mask, all slots) and
SDPA with no mask over exactly the keys in use (the best a dynamic cache could do).

    python benchmarks/static_decode_op.py        # GPU; writes results/static_decode_op_cuda.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from selfextend_llm.kernels.static_decode import decode_step

SHAPES = ((9, 3, 64), (32, 8, 128))  # (query heads, KV heads, head dim): SmolLM2-135M, Llama-3-8B-like


def _graph_time(fn, replays: int = 200) -> float:
    """Microseconds per call of ``fn`` replayed from a CUDA graph (median of 5 batches)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / replays)
    return sorted(times)[2]


def measure(heads: int, kv_heads: int, dim: int, n: int, G: int, W: int) -> dict[str, float]:
    """GPU microseconds per step of the three contenders for one shape."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    torch.manual_seed(0)
    q = torch.randn(1, heads, 1, dim, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, n, dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    grouped = torch.randn_like(k)
    used = n - 128  # a cache bucket with 128 slots still free
    row_mask = (torch.arange(n, device=device) < used)[None, None, None, :]
    pos = torch.full((1, 1), used - 1, device=device)
    rep, scale = heads // kv_heads, dim**-0.5

    def se_step():
        return decode_step(q, k, v, row_mask, pos, grouped, group_size=G, neighbor_window=W,
                           inv_freq=inv_freq, layout="half", scale=scale)  # fmt: skip

    def hf_plain():
        kr = k[:, :, None].expand(1, kv_heads, rep, n, dim).reshape(1, heads, n, dim)
        vr = v[:, :, None].expand(1, kv_heads, rep, n, dim).reshape(1, heads, n, dim)
        return F.scaled_dot_product_attention(q, kr, vr, attn_mask=row_mask, scale=scale)

    def exact():
        return F.scaled_dot_product_attention(q, k[:, :, :used], v[:, :, :used], scale=scale, enable_gqa=True)

    got = {}
    for name, fn in (("selfextend", se_step), ("hf_plain", hf_plain), ("sdpa_exact", exact)):
        torch._dynamo.reset()
        got[name] = _graph_time(torch.compile(fn, fullgraph=True, dynamic=False))
    return got


def main() -> None:
    G, W = 4, 1024
    rows = []
    print(f"{torch.cuda.get_device_name()}, bf16, G={G} W={W}")
    cols = ("SE step", "HF plain", "SDPA exact", "SE/HF", "SE/ex")
    print(
        f"{'heads':>8} {'dim':>4} {'keys':>6} "
        + " ".join(f"{c:>{w}}" for c, w in zip(cols, (9, 9, 10, 6, 6), strict=True))
    )
    for heads, kv_heads, dim in SHAPES:
        for n in (16384, 32768, 65536):
            got = measure(heads, kv_heads, dim, n, G, W)
            row = {"heads": heads, "kv_heads": kv_heads, "dim": dim, "keys": n}
            row.update({f"{name}_us": us for name, us in got.items()})
            row["ratio_vs_hf_plain"] = got["selfextend"] / got["hf_plain"]
            row["ratio_vs_sdpa_exact"] = got["selfextend"] / got["sdpa_exact"]
            rows.append(row)
            print(
                f"{heads:>3}/{kv_heads:<4} {dim:>4} {n:>6} {got['selfextend']:>7.1f}us {got['hf_plain']:>7.1f}us "
                f"{got['sdpa_exact']:>8.1f}us {row['ratio_vs_hf_plain']:>6.2f} {row['ratio_vs_sdpa_exact']:>6.2f}",
                flush=True,
            )
    out = Path("results/static_decode_op_cuda.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                               "group_size": G, "neighbor_window": W, "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
