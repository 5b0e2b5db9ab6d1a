"""One attention layer on the CPU: SelfExtend's block path next to plain causal SDPA, checked and timed.

The embedded default's shape (9 query heads, 3 KV heads, head dim 64, fp32).  Variants:

* ``unmasked`` (what a prompt without padding runs): the grouped part in two large fused calls, the
  plain band in 1,024-row blocks, no mask tensor anywhere;
* ``padded``: the same call with a (all-true) padding mask, which takes the general per-block path
  (128-row blocks, every range masked): what left-padded batches run.

Each variant is checked against the float64 formula on a short prefix first, then timed interleaved
with plain SDPA (median of ``--repeats``), because this machine's speed drifts between runs.

    python benchmarks/cpu_attention_layer.py --lengths 8192 16384 --settings 2,4096 6,4096 16,4096
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from selfextend_llm.attention import selfextend_attention
from selfextend_llm.reference import reference_selfextend


def _inputs(n: int, heads: int = 9, kv_heads: int = 3, d: int = 64):
    g = torch.Generator().manual_seed(n)
    q = torch.randn(1, heads, n, d, generator=g)
    k = torch.randn(1, kv_heads, n, d, generator=g)
    v = torch.randn(1, kv_heads, n, d, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    return q, k, v, inv


def _selfextend(q, k, v, inv, group: int, window: int, padded: bool):
    n = q.shape[2]
    valid = torch.ones(1, n, dtype=torch.bool) if padded else None
    out, _ = selfextend_attention(
        q, k, v, query_positions=torch.arange(n)[None], query_start=0, group_size=group, neighbor_window=window,
        inv_freq=inv.float(), scale=q.shape[-1] ** -0.5, key_valid=valid,
    )  # fmt: skip
    return out


def _interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taking turns (after one warm-up call each)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--settings", nargs="+", default=["2,4096", "6,4096", "16,4096"], help="G,W pairs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="results/cpu_attention_layer.json")
    args = ap.parse_args()
    rows = []
    print(f"{'tokens':>7} {'G,W':>8} {'plain ms':>9} {'unmasked':>15} {'padded':>15}", flush=True)
    with torch.inference_mode():
        for n in args.lengths:
            q, k, v, inv = _inputs(n)
            for setting in args.settings:
                group, window = (int(x) for x in setting.split(","))
                m = min(n, window + 600)  # a prefix long enough to have every key range, checked exactly
                ref = reference_selfextend(
                    q[:, :, :m], k[:, :, :m], v[:, :, :m], query_positions=torch.arange(m)[None],
                    key_positions=torch.arange(m)[None], group_size=group, neighbor_window=window, inv_freq=inv,
                    scale=q.shape[-1] ** -0.5,
                )  # fmt: skip
                for padded in (False, True):
                    got = _selfextend(q[:, :, :m], k[:, :, :m], v[:, :, :m], inv, group, window, padded)
                    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
                sdpa = torch.nn.functional.scaled_dot_product_attention
                fns = {
                    "plain": functools.partial(sdpa, q, k, v, is_causal=True, enable_gqa=True),
                    "unmasked": functools.partial(_selfextend, q, k, v, inv, group, window, False),
                    "padded": functools.partial(_selfextend, q, k, v, inv, group, window, True),
                }
                times = _interleaved(fns, args.repeats)
                med = {name: statistics.median(t) for name, t in times.items()}
                row = {"tokens": n, "group": group, "window": window}
                row.update({f"{name}_ms": t * 1e3 for name, t in med.items()})
                row.update(unmasked_ratio=med["unmasked"] / med["plain"], padded_ratio=med["padded"] / med["plain"])
                rows.append(row)
                unmasked = f"{med['unmasked'] * 1e3:>7.0f} ({row['unmasked_ratio']:.2f}x)"
                padded = f"{med['padded'] * 1e3:>7.0f} ({row['padded_ratio']:.2f}x)"
                print(f"{n:>7} {setting:>8} {med['plain'] * 1e3:>9.0f} {unmasked} {padded}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "shape": "9/3 heads, d 64, fp32"}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
