"""CPU decode on the C kernels, in one process, taking turns (issue 19).

This 2-core machine drifts by 10-30% between processes, so ``speed_memory.py``'s one process per setting
reads drift as differences.  Here one loaded model (the embedded default, quantised weights, the shipped
table's setting for the length) decodes the same prompt three ways, for several rounds, keeping the median
step of each round: ``step`` is the shipped path (whole decode steps in one C call,
:mod:`selfextend_llm.hf.native_step`); ``c`` is transformers' eager layers with only the attention and the
products on C (:mod:`selfextend_llm.kernels.native`, the fourth pass); ``torch`` has every C kernel off
(the Inductor kernels and PyTorch's matrix products, as shipped before).  ``plain`` runs the same with
SelfExtend removed (in ``c`` and ``torch`` its attention is transformers' SDPA; in ``step`` it is the same C
loop with no grouped keys).  Prints one line per run and a summary, and writes ``results/cpu_native_kernels.json``.

    python benchmarks/cpu_native_kernels.py --lengths 1920 7936 --rounds 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList

import selfextend_llm
from selfextend_llm.hf import native_step
from selfextend_llm.kernels import native
from selfextend_llm.kernels import quantized as q
from selfextend_llm.tasks.passkey import passkey_prompt

KERNELS = ("step", "c", "torch")


class _Stamps:
    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def decode_steps(se, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Median seconds per decode step of one greedy generate, and its tokens."""
    stamps = _Stamps()
    base = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=se.tokenizer.pad_token_id)
    with torch.inference_mode():
        out = se.model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, logits_processor=LogitsProcessorList([stamps]),
            **base, **se.fast.generate_kwargs(1, ids.shape[1] + new_tokens),
        )  # fmt: skip
    steps = [b - a for a, b in zip(stamps.times, stamps.times[1:], strict=False)]
    return statistics.median(steps), out[0, ids.shape[1] :].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1920, 7936])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--out", default="results/cpu_native_kernels.json")
    args = ap.parse_args()
    if native.library() is None:
        raise SystemExit(f"the C kernels do not build here: {native.unavailable()}")
    se = selfextend_llm.load(target_context=131_072)
    for layer in se.model.modules():  # the 'off' state is the shipped path before the C kernels
        if isinstance(layer, q.QuantizedLinear):
            layer.one_row = q.one_row_kernel(layer._weight())
    rows = []
    for n in args.lengths:
        ids = torch.tensor([se.encode(passkey_prompt(n + 64, 0.5, 0, se.count_tokens).text)[:n]])
        config = se.plan.config_for(n + args.new_tokens)
        for method in ("selfextend", "plain"):
            selfextend_llm.remove(se.model)
            if method == "selfextend" and config is not None:
                selfextend_llm.apply(se.model, config)
            tokens = {}
            for rnd in range(args.rounds):
                for kernels in KERNELS:
                    if kernels == "c":
                        native_step.uninstall(se.model)
                    with contextlib.nullcontext() if kernels != "torch" else native.disabled():
                        step, tokens[kernels] = decode_steps(se, ids, args.new_tokens)
                    if kernels == "c":
                        native_step.install(se.model)
                    row = {"tokens": n, "method": method, "kernels": kernels, "round": rnd, "step_ms": step * 1e3}
                    rows.append(row)
                    print(f"{n:>6} {method:>10} {kernels:>5} round {rnd}: {step * 1e3:6.1f} ms/step", flush=True)
            for row in rows[-len(KERNELS) * args.rounds :]:
                row["same_tokens"] = tokens["step"] == tokens["c"] == tokens["torch"]
    print(
        "\n| prompt | method | whole step in C | C kernels in eager layers | PyTorch/Inductor | step vs torch "
        "| same tokens |\n|---|---|---|---|---|---|---|"
    )
    summary = []
    for n in args.lengths:
        for method in ("selfextend", "plain"):
            mine = [r for r in rows if r["tokens"] == n and r["method"] == method]
            ms = {k: statistics.median(r["step_ms"] for r in mine if r["kernels"] == k) for k in KERNELS}
            same = all(r["same_tokens"] for r in mine)
            timings = {f"{k}_ms": v for k, v in ms.items()}
            summary.append({"tokens": n, "method": method, **timings, "same_tokens": same})
            cells = " | ".join(f"{ms[k]:.1f} ms ({1e3 / ms[k]:.1f} tok/s)" for k in KERNELS)
            print(f"| {n:,} | {method} | {cells} | {ms['torch'] / ms['step']:.2f}x | {same} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "native": native.describe()}
    meta["decode_step"] = se.native_decoder.describe() if not isinstance(se.native_decoder, str) else se.native_decoder
    out.write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
