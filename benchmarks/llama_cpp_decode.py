"""CPU decode and prefill against llama.cpp on the same GGUF file, in one run (issue 32's target: >= 0.8x).

llama.cpp's ``llama-bench`` reads the embedded default's GGUF (``-t`` threads, ``pp<N>``: a prompt of N tokens;
``tg<K> @ d<N>``: K tokens generated after N in the cache); this package's product path (``selfextend_llm.load()``,
``complete()``: the static cache, the whole decode step in C over the file's 4-/8-bit blocks) gets a prompt of the
same length and generates K tokens (``min_new_tokens``), a logits processor stamping each step: prefill is the time
to the first step, decode the steps after it.  The two take turns ``--rounds`` times; the table gives the median of
each.  SelfExtend runs what the model's table gives each length (plain inside the trained window); the prefix cache
is off so that every prompt is computed whole.

    make tools/llama-bench      # builds llama.cpp's llama-bench from the llama-cpp-python source package
    python benchmarks/llama_cpp_decode.py --llama-bench tools/llama-bench --lengths 1920 7936

Writes ``results/llama_cpp_decode.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import selfextend_llm
from selfextend_llm.loading import default_gguf_path
from selfextend_llm.tasks.passkey import make_passkey_document


class _Stamps:
    """A logits processor that only records when each decode step's logits arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def llama_bench(binary: str, gguf: Path, threads: int, length: int, new_tokens: int, repetitions: int) -> dict:
    """llama-bench's prefill of ``length`` tokens and decode of ``new_tokens`` after ``length``, tokens/s."""
    run = subprocess.run(
        [binary, "-m", str(gguf), "-t", str(threads), "-r", str(repetitions), "-o", "json",
         "-p", str(length), "-n", "0", "-pg", "0,0"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    prefill = json.loads(run.stdout)[0]["avg_ts"]
    run = subprocess.run(
        [binary, "-m", str(gguf), "-t", str(threads), "-r", str(repetitions), "-o", "json",
         "-p", "0", "-n", str(new_tokens), "-d", str(length)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {"prefill_tok_s": prefill, "decode_tok_s": json.loads(run.stdout)[0]["avg_ts"]}


def ours(model, prompt: str, new_tokens: int) -> dict:
    """One greedy ``complete`` of ``new_tokens`` tokens: prefill and decode tokens/s from the step stamps."""
    stamps = _Stamps()
    started = time.perf_counter()
    done = model.complete(
        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, logits_processor=[stamps], temperature=0
    )
    steps = stamps.times
    return {
        "prompt_tokens": done.prompt_tokens,
        "prefill_tok_s": done.prompt_tokens / (steps[0] - started),
        "decode_tok_s": (len(steps) - 1) / (steps[-1] - steps[0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True, help="path to llama.cpp's llama-bench (make tools/llama-bench)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1920, 7936])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=3, help="llama-bench's -r")
    ap.add_argument("--out", default="results/llama_cpp_decode.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = selfextend_llm.load(prefix_cache_bytes=0)
    gguf = default_gguf_path()

    def count(text: str) -> int:
        return len(model.tokenizer(text)["input_ids"])

    rows = []
    for n in args.lengths:
        doc, _ = make_passkey_document(n, 0.5, n, count)
        question = "\nThe pass key is"
        ids = model.tokenizer(doc)["input_ids"][: n - count(question)]
        prompt = model.tokenizer.decode(ids) + question  # about n tokens, as llama-bench's prompt
        ours(model, prompt[: len(prompt) // 8], 4)  # warm-up: the static-cache buckets, the C step
        theirs, mine = [], []
        for _ in range(args.rounds):
            theirs.append(llama_bench(args.llama_bench, gguf, args.threads, n, args.new_tokens, args.repetitions))
            mine.append(ours(model, prompt, args.new_tokens))
        grouping = model.grouping_for(mine[0]["prompt_tokens"] + args.new_tokens)
        label = grouping.label if grouping else "plain"
        row = {"length": n, "prompt_tokens": mine[0]["prompt_tokens"], "grouping": label}
        for who, runs in (("llama_cpp", theirs), ("selfextend_llm", mine)):
            for key in ("prefill_tok_s", "decode_tok_s"):
                row[f"{who}_{key}"] = statistics.median(r[key] for r in runs)
                row[f"{who}_{key}_runs"] = [round(r[key], 1) for r in runs]
        row["decode_ratio"] = row["selfextend_llm_decode_tok_s"] / row["llama_cpp_decode_tok_s"]
        row["prefill_ratio"] = row["selfextend_llm_prefill_tok_s"] / row["llama_cpp_prefill_tok_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| prompt | grouping | llama.cpp decode | ours decode | **decode ratio** | llama.cpp prefill ", end="")
    print("| ours prefill | prefill ratio |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['prompt_tokens']:,} | {r['grouping']} | {r['llama_cpp_decode_tok_s']:.1f} tok/s "
            f"| {r['selfextend_llm_decode_tok_s']:.1f} tok/s | **{r['decode_ratio']:.2f}x** "
            f"| {r['llama_cpp_prefill_tok_s']:.0f} tok/s | {r['selfextend_llm_prefill_tok_s']:.0f} tok/s "
            f"| {r['prefill_ratio']:.2f}x |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "gguf": gguf.name}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
