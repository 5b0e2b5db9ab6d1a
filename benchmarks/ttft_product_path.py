"""Time to first token through ``complete()`` against plain transformers' ``generate``, same model, one run.

Issue 32 measured 1.55x at 64k on an H100 (0.648 s through ``complete()``, 0.419 s for the plain model's
``generate``): overhead of the product path (encoding, prefix cache, static-cache set-up), not of attention.  Here,
for each length, in one process on one loaded model: ``plain generate`` (SelfExtend removed, transformers' own
attention, dynamic cache), ``SelfExtend generate`` (the patched model, dynamic cache: attention's cost alone) and
``complete()`` (the product path: the model's grouping for the length, static cache, prefix cache off), and
``encode`` (the text to ids, which ``complete()`` does and the ``generate`` rows are spared).  Each is warmed once,
then the median of ``--repeats`` timed calls of one new token.

    python benchmarks/ttft_product_path.py --lengths 16384 65536     # GPU, embedded default in bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import selfextend_llm
from selfextend_llm.hf import apply as hf_apply
from selfextend_llm.tasks.passkey import passkey_prompt


def _timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: compilation, allocator, kernels' autotuning
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--target-context", type=int, default=None, help="load()'s target_context (default: its own)")
    ap.add_argument("--out", default="results/ttft_product_path.json")
    args = ap.parse_args()
    target = args.target_context or max(args.lengths) + 64
    se = selfextend_llm.load(dtype=args.dtype, prefix_cache_bytes=0, target_context=target)
    lm, device = se.model, se.device
    rows = []
    for n in args.lengths:
        prompt = passkey_prompt(n - 32, 0.5, n, se.count_tokens).text
        ids = torch.tensor([se.encode(prompt)], device=device)
        grouping = se.grouping_for(ids.shape[1] + 1)

        def plain_generate(ids: torch.Tensor = ids) -> None:
            with torch.inference_mode():
                lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)

        def complete(prompt: str = prompt) -> None:
            se.complete(prompt, max_new_tokens=1)

        def encode(prompt: str = prompt) -> None:
            se.encode(prompt)

        row = {"length": n, "prompt_tokens": ids.shape[1], "grouping": grouping.label if grouping else "plain"}
        row["complete_s"] = _timed(complete, args.repeats)
        row["encode_s"] = _timed(encode, args.repeats)  # the text's share of complete(): plain generate gets ids
        loaded = hf_apply.settings_of(lm).config if hf_apply.is_applied(lm) else None
        if grouping is not None:
            hf_apply.apply(lm, grouping)
            row["selfextend_generate_s"] = _timed(plain_generate, args.repeats)
        hf_apply.remove(lm)
        row["plain_generate_s"] = _timed(plain_generate, args.repeats)
        if loaded is not None:  # as the model was loaded, for the next length's complete()
            hf_apply.apply(lm, loaded)
        for key in [k for k in row if k.endswith("_s")]:
            row[key.removesuffix("_s") + "_median_s"] = statistics.median(row[key])
        row["complete_vs_plain"] = row["complete_median_s"] / row["plain_generate_median_s"]
        # a plain-transformers user encodes the text too: the fair comparison adds it to the plain side
        row["complete_vs_plain_with_encode"] = row["complete_median_s"] / (
            row["plain_generate_median_s"] + row["encode_median_s"]
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| prompt | grouping | plain generate | SelfExtend generate | encode | complete() | **complete / plain** "
        "| complete / (encode + plain) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        se_gen = f"{r['selfextend_generate_median_s']:.3f} s" if "selfextend_generate_median_s" in r else "-"
        print(
            f"| {r['prompt_tokens']:,} | {r['grouping']} | {r['plain_generate_median_s']:.3f} s | {se_gen} "
            f"| {r['encode_median_s']:.3f} s | {r['complete_median_s']:.3f} s | **{r['complete_vs_plain']:.2f}x** "
            f"| {r['complete_vs_plain_with_encode']:.2f}x |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meta = {"device": device_name, "dtype": str(next(lm.parameters()).dtype)}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
