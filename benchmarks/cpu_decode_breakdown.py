"""Where a CPU decode step's time goes on the whole-step C path (issue 19): the C call against the whole forward.

One loaded model (the embedded default on its GGUF blocks), a prompt of each length prefilled into a static
cache, then the same decode step repeated (each layer's ``cumulative_length`` reset before it, so every repeat
writes the same slot and reads the same cache) with SelfExtend (the shipped table's setting for the length) and
plain, taking turns.  ``C call`` is the time inside :func:`selfextend_llm.kernels.native.step.run` (every
layer); ``forward`` is the model's whole forward (embedding, RoPE tables, the C call, final norm, lm head).  At 64
tokens attention is negligible, so the C call there is the projections.  Prints a table, writes
``results/cpu_decode_breakdown.json``.

    python benchmarks/cpu_decode_breakdown.py --lengths 64 1920 7936 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import StaticCache

import selfextend_llm
from selfextend_llm.kernels.native import step as kernel_step
from selfextend_llm.tasks.passkey import passkey_prompt


def time_step(se, ids: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median (forward, C call) seconds of one decode step after prefilling ``ids``."""
    model, n = se.model, ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n + 64)
    run, inside = kernel_step.run, []

    def timed(*args, **kwargs):
        started = time.perf_counter()
        code = run(*args, **kwargs)
        inside.append(time.perf_counter() - started)
        return code

    forward = []
    with torch.inference_mode():
        token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        kernel_step.run = timed
        try:
            for _ in range(repeats):
                for layer in cache.layers:
                    layer.cumulative_length.fill_(n)
                started = time.perf_counter()
                model(token, past_key_values=cache, use_cache=True)
                forward.append(time.perf_counter() - started)
        finally:
            kernel_step.run = run
    if len(inside) != repeats:
        raise SystemExit(f"the whole-step C path did not run every step: {se.describe()['cpu_kernels']}")
    return statistics.median(forward), statistics.median(inside)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 1920, 7936])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="results/cpu_decode_breakdown.json")
    args = ap.parse_args()
    se = selfextend_llm.load(target_context=131_072)
    rows = []
    for n in args.lengths:
        ids = torch.tensor([se.encode(passkey_prompt(n + 64, 0.5, 0, se.count_tokens).text)[:n]])
        config = se.plan.config_for(n + 1)
        for rnd in range(args.rounds):
            for method in ("selfextend", "plain"):
                selfextend_llm.remove(se.model)
                if method == "selfextend" and config is not None:
                    selfextend_llm.apply(se.model, config)
                forward, inside = time_step(se, ids, args.repeats)
                grouping = "plain" if method == "plain" or config is None else str(config)
                row = {"tokens": n, "method": method, "grouping": grouping, "round": rnd}
                rows.append({**row, "forward_ms": forward * 1e3, "c_call_ms": inside * 1e3})
                timing = f"forward {forward * 1e3:6.1f} ms, C call {inside * 1e3:6.1f} ms"
                print(f"{n:>6} {method:>10} round {rnd}: {timing}", flush=True)
    print("\n| prompt | method | C call | forward | outside the C call |\n|---|---|---|---|---|")
    summary = []
    for n in args.lengths:
        for method in ("selfextend", "plain"):
            mine = [r for r in rows if r["tokens"] == n and r["method"] == method]
            c = [round(r["c_call_ms"], 1) for r in mine]
            f = [round(r["forward_ms"], 1) for r in mine]
            summary.append({"tokens": n, "method": method, "c_call_ms": c, "forward_ms": f})
            rest = statistics.median(r["forward_ms"] - r["c_call_ms"] for r in mine)
            print(f"| {n:,} | {method} | {' / '.join(map(str, c))} ms | {' / '.join(map(str, f))} ms | {rest:.1f} ms |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}
    out.write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
