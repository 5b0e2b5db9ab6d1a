"""One attention layer on the GPU: SelfExtend's kernels next to plain SDPA, checked and timed in one run.

Variants (all exact SelfExtend, checked against the float64 two-score-matrix formula first):

* ``split``: the default on CUDA for a whole prefill: the grouped part (almost all the work) through
  the fused causal kernel plain SDPA uses (cuDNN on Hopper), the neighbor band and the merge in
  one Triton kernel;
* ``triton``: the fused one-pass kernel (grouped rotation in registers), used for prefill chunks
  and padded batches; for decoding, the split-K kernel;
* ``flex``: two block-sparse ``flex_attention`` passes on pre-rotated q/k, merged by log-sum-exp;
* ``blocks`` (decode only): two memory-efficient SDPA calls on the cached grouped keys, merged.

Prints a table and writes ``results/attention_kernels*.json``; ``--markdown`` appends the table to
a Markdown file (BENCHMARKS.md) with the GPU named.

    python benchmarks/attention_kernels.py --lengths 8192 16384 32768 65536
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from selfextend_llm.attention import selfextend_attention
from selfextend_llm.reference import reference_selfextend
from selfextend_llm.rope import rotate


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, inner: int = 1) -> float:
    """Median seconds per call; ``inner`` calls are queued between synchronisations (as in a model)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        times.append((time.perf_counter() - start) / inner)
    return sorted(times)[len(times) // 2]


def graph_timed(fn, repeats: int, inner: int = 20) -> float:
    """Median GPU seconds per call, replayed from a CUDA graph: kernel time without Python's
    launch overhead (what a model under CUDA graphs, e.g. torch.compile, would pay; in eager
    prefill the host usually runs ahead of the GPU, so this is also what a model layer costs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    sync()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        sync()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return sorted(times)[len(times) // 2]


def graph_timed_or_nan(fn, repeats: int, inner: int) -> float:
    try:
        return graph_timed(fn, repeats, inner)
    except RuntimeError as err:  # a kernel that cannot be captured: say so, keep the host timings
        print(f"CUDA graph capture failed ({str(err)[:120]}); GPU column left empty")
        return float("nan")


def peak(fn) -> float:
    """Peak extra GPU memory of one call, in MiB."""
    if not torch.cuda.is_available():
        return float("nan")
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def make(n, h, kvh, d, dev, dtype, inv, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(1, h, n, d, device=dev, dtype=dtype, generator=g)
    k = torch.randn(1, kvh, n, d, device=dev, dtype=dtype, generator=g)
    v = torch.randn(1, kvh, n, d, device=dev, dtype=dtype, generator=g)
    pos = torch.arange(n, device=dev)[None]
    return rotate(q, pos, inv), rotate(k, pos, inv), v, pos


def time_decode(se, q, k, v, pos, repeats: int) -> dict[str, float]:
    """One token decoded against ``n`` cached keys: plain SDPA, the split-K kernel, the block path."""
    n = k.shape[2]
    q1, p1 = q[:, :, -1:], pos[:, -1:]
    blocks = "cuda_efficient" if q.is_cuda else "auto"  # the LSE-merge path, with its grouped-key cache
    cache = se(q[:, :, -2:-1], k[:, :, : n - 1], v[:, :, : n - 1], pos[:, -2:-1], n - 2, blocks)[1]
    variants = {
        "plain": lambda: F.scaled_dot_product_attention(q1, k, v, enable_gqa=True),
        "triton": lambda: se(q1, k, v, p1, n - 1, "triton"),
        "blocks": lambda: se(q1, k, v, p1, n - 1, blocks, cache),
    }
    row = {f"decode_{name}_ms": timed(fn, repeats, inner=20) * 1e3 for name, fn in variants.items()}
    for name in ("triton", "blocks"):
        row[f"decode_{name}_ratio"] = row[f"decode_{name}_ms"] / row["decode_plain_ms"]
    if q.is_cuda:  # GPU time alone, from CUDA graphs
        for name in ("plain", "triton"):
            row[f"decode_{name}_gpu_ms"] = graph_timed(variants[name], repeats) * 1e3
        row["decode_triton_gpu_ratio"] = row["decode_triton_gpu_ms"] / row["decode_plain_gpu_ms"]
    return row


def plot(paths: list[str], out: str) -> None:
    """Ratio to plain SDPA against length (GPU time), one panel per results file, with the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(paths), figsize=(5.5 * len(paths), 4), squeeze=False)
    for ax, path in zip(axes[0], paths, strict=True):
        data = json.loads(Path(path).read_text())
        rows = data["rows"]
        tokens = [r["tokens"] for r in rows]
        series = [
            ("split_gpu_ratio", "prefill, split (default)", "o-"),
            ("triton_gpu_ratio", "prefill, one-pass", "s--"),
        ]
        series += [("decode_triton_gpu_ratio", "decode, split-K", "^-")]
        for key, label, style in series:
            if key in rows[0]:
                ax.plot(tokens, [r[key] for r in rows], style, label=label)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.15, color="green", ls=":", lw=1, label="target: prefill 32k+ (1.15x)")
        ax.axhline(1.2, color="purple", ls=":", lw=1, label="target: decode (1.2x)")
        ax.axhline(1.3, color="orange", ls=":", lw=1, label="target: prefill 8k (1.3x)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens, [f"{t // 1024}k" for t in tokens])
        ax.set_ylim(0.9, max(2.0, max(r.get("triton_gpu_ratio", 1) for r in rows) + 0.1))
        ax.set_xlabel("tokens")
        ax.set_ylabel("time / plain SDPA (GPU time)")
        ax.set_title(
            f"{data['device']}\n{data['heads']}/{data['kv_heads']} heads, head dim {data['head_dim']}", fontsize=9
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plot", nargs="+", metavar="JSON", help="only plot these results files (no GPU needed)")
    ap.add_argument("--plot-out", default="results/attention_kernels.png")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--variants", nargs="+", default=["split", "triton"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", default=None, help="append the table to this Markdown file")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot, args.plot_out)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor()
    d, h, kvh, G, W = args.head_dim, args.heads, args.kv_heads, args.group, args.window
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev).float() / d))
    common = dict(group_size=G, neighbor_window=W, inv_freq=inv, scale=d**-0.5)

    def se(q, k, v, pos, start, backend, cache=None):
        return selfextend_attention(
            q, k, v, query_positions=pos, query_start=start, backend=backend, key_cache=cache, **common
        )  # fmt: skip

    # exactness on a prefix that is no block multiple, against the float64 formula
    n_chk = 3001
    q, k, v, pos = make(n_chk, h, kvh, d, dev, dtype, inv)
    ref = reference_selfextend(q, k, v, query_positions=pos, key_positions=pos, **common)
    errors = {}
    blocks = "cuda_efficient" if dev == "cuda" else "auto"
    with torch.inference_mode():
        for name in args.variants:
            out = se(q, k, v, pos, 0, name)[0]
            errors[name] = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        for name in ("triton", "blocks"):
            cache = None
            if name == "blocks":
                cache = se(q[:, :, -2:-1], k[:, :, :-1], v[:, :, :-1], pos[:, -2:-1], n_chk - 2, blocks)[1]
            backend = "triton" if name == "triton" else blocks
            out = se(q[:, :, -1:], k, v, pos[:, -1:], n_chk - 1, backend, cache)
            errors[f"decode_{name}"] = ((out[0].double() - ref[:, :, -1:]).abs().max() / ref.abs().max()).item()
    print(f"device {device_name}; {h} heads / {kvh} KV heads, head dim {d}, G={G}, W={W}, {dtype}")
    print(
        "relative max error vs float64 formula at n=3001: " + ", ".join(f"{name} {e:.1e}" for name, e in errors.items())
    )

    rows = []
    for n in args.lengths:
        q, k, v, pos = make(n, h, kvh, d, dev, dtype, inv, seed=n)
        row = {"tokens": n}
        with torch.inference_mode():
            plain = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            row["plain_ms"] = timed(plain, args.repeats) * 1e3
            row["plain_mib"] = peak(plain)
            if dev == "cuda":
                row["plain_gpu_ms"] = graph_timed_or_nan(plain, args.repeats, inner=3) * 1e3
            for name in args.variants:
                fn = lambda q=q, k=k, v=v, pos=pos, name=name: se(q, k, v, pos, 0, name)
                row[f"{name}_ms"] = timed(fn, args.repeats) * 1e3
                row[f"{name}_ratio"] = row[f"{name}_ms"] / row["plain_ms"]
                if dev == "cuda":
                    row[f"{name}_gpu_ms"] = graph_timed_or_nan(fn, args.repeats, inner=3) * 1e3
                    row[f"{name}_gpu_ratio"] = row[f"{name}_gpu_ms"] / row["plain_gpu_ms"]
                row[f"{name}_mib"] = peak(fn)
                row[f"{name}_mem_ratio"] = row[f"{name}_mib"] / row["plain_mib"]
            row.update(time_decode(se, q, k, v, pos, args.repeats))
        del q, k, v
        torch.cuda.empty_cache() if dev == "cuda" else None
        rows.append(row)
        print(json.dumps({key: round(x, 3) if isinstance(x, float) else x for key, x in row.items()}), flush=True)

    gpu = "decode_triton_gpu_ratio" in rows[0]
    header = ["tokens", "plain SDPA ms"]
    for name in args.variants:
        header += [f"{name} ms", f"{name} ratio"] + ([f"{name} GPU ratio"] if gpu else [])
    header += ["plain decode ms"] + [f"{n} decode ratio" for n in ("triton", "blocks")]
    if gpu:
        header += ["plain decode GPU ms", "triton decode GPU ratio"]
    header += ["plain MiB"] + [f"{n} MiB" for n in args.variants]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"{r['tokens']:,}", f"{r['plain_ms']:.2f}"]
        for name in args.variants:
            cells += [f"{r[f'{name}_ms']:.2f}", f"{r[f'{name}_ratio']:.2f}x"]
            cells += [f"{r[f'{name}_gpu_ratio']:.2f}x"] if gpu else []
        cells += [f"{r['decode_plain_ms']:.3f}", f"{r['decode_triton_ratio']:.2f}x", f"{r['decode_blocks_ratio']:.2f}x"]
        if gpu:
            cells += [f"{r['decode_plain_gpu_ms']:.3f}", f"{r['decode_triton_gpu_ratio']:.2f}x"]
        cells += [f"{r['plain_mib']:.0f}"] + [f"{r[f'{n}_mib']:.0f}" for n in args.variants]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out or f"results/attention_kernels_d{d}_h{h}_kv{kvh}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device_name, "dtype": str(dtype), "heads": h, "kv_heads": kvh, "head_dim": d, "group": G,
        "window": W, "torch": torch.__version__, "date": datetime.date.today().isoformat(), "errors": errors,
    }  # fmt: skip
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(
                f"\n### {device_name}, {h} query heads / {kvh} KV heads, head dim {d}, G={G}, W={W}, {dtype}\n\n"
                f"`python benchmarks/attention_kernels.py --heads {h} --kv-heads {kvh} --head-dim {d} "
                f"--lengths {' '.join(map(str, args.lengths))}`, {meta['date']}, torch {torch.__version__}. "
                "Relative max error vs the float64 formula (n=3001): "
                + ", ".join(f"{name} {e:.1e}" for name, e in errors.items())
                + ".\n\n"
                + table
                + "\n"
            )


if __name__ == "__main__":
    main()
