"""Constrained decoding's per-token cost on any device, from recorded answers (so a GPU needs no model).

Step 1, here on the CPU: the embedded default answers each schema of ``constrained_decoding.py`` (and one
forced tool call) under the constraint; the token ids and the tokenizer are written out.
Step 2, anywhere: the token sequences are replayed through xgrammar and llguidance with the logits on the
chosen device (mask filled on the host, copied, applied there), timing what each library adds per token.

    python benchmarks/constrained_replay.py record results/tmp/replay      # tokens.json + tokenizer files
    python benchmarks/constrained_replay.py replay results/tmp/replay --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from constrained_decoding import QUESTIONS, SCHEMAS, replay_costs  # noqa: E402

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}


def record(folder: Path) -> None:
    import selfextend_llm

    model = selfextend_llm.load(device="cpu")
    folder.mkdir(parents=True, exist_ok=True)
    model.tokenizer.save_pretrained(folder)
    runs = []
    for (name, schema), question in zip(SCHEMAS.items(), QUESTIONS, strict=True):
        fmt = {"type": "json_schema", "json_schema": {"schema": schema}} if schema else {"type": "json_object"}
        for seed in range(3):
            done = model.complete([{"role": "user", "content": question}], response_format=fmt, max_new_tokens=200,
                                  temperature=0.7, seed=seed)  # fmt: skip
            runs.append({"schema_name": name, "schema": schema, "tokens": model.tokenize(done.text)})
    messages = [{"role": "user", "content": "Weather in Oslo for 3 days?"}]
    done = model.complete(messages, tools=[WEATHER], tool_choice="get_weather", max_new_tokens=60)
    runs.append(
        {"schema_name": "forced tool call (lark grammar)", "tool": WEATHER, "tokens": model.tokenize(done.text)}
    )
    vocab = model.model.get_output_embeddings().weight.shape[0]
    (folder / "tokens.json").write_text(json.dumps({"vocab": vocab, "runs": runs}))
    print(f"wrote {folder / 'tokens.json'} ({len(runs)} answers)")


def _tool_call_cost(tokenizer, tool: dict, tokens: list[int], vocab: int, device: str) -> float:
    """llguidance on the forced-call grammar (xgrammar has no equivalent in the shipped path)."""
    import llguidance
    import llguidance.hf
    import llguidance.torch

    from selfextend_llm.tools import call_grammar

    logits = torch.randn(1, vocab, device=device)
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_lark(call_grammar([tool], None)))
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    times = []
    for t in tokens:
        start = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        llguidance.torch.apply_token_bitmask_inplace(logits, mask.to(logits.device, non_blocking=True))
        if logits.is_cuda:
            torch.cuda.synchronize()
        matcher.consume_token(t)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def replay(folder: Path, device: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = json.loads((folder / "tokens.json").read_text())
    vocab, by_name = data["vocab"], {}
    for run in data["runs"]:
        entry = by_name.setdefault(run["schema_name"], {"xgrammar_us": [], "llguidance_us": []})
        if "tool" in run:
            entry["llguidance_us"].append(_tool_call_cost(tokenizer, run["tool"], run["tokens"], vocab, device))
            continue
        costs = replay_costs(tokenizer, run["schema"], run["tokens"], vocab, device)
        entry["xgrammar_us"].append(costs["xgrammar_us"])
        entry["llguidance_us"].append(costs["llguidance_us"])
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    rows = [
        {
            "schema": k,
            "xgrammar_us_per_token": statistics.median(v["xgrammar_us"]) if v["xgrammar_us"] else None,
            "llguidance_us_per_token": statistics.median(v["llguidance_us"]),
        }
        for k, v in by_name.items()
    ]
    print(f"\n{name}: per-token cost of the constraint (mask on the host, applied to {device} logits), median\n")
    print("| schema | xgrammar us/token | llguidance us/token |\n|---|---|---|")
    for r in rows:
        xg = "-" if r["xgrammar_us_per_token"] is None else f"{r['xgrammar_us_per_token']:.0f}"
        print(f"| {r['schema']} | {xg} | {r['llguidance_us_per_token']:.0f} |")
    tag = name.replace("NVIDIA ", "").split()[0].lower() if device == "cuda" else "cpu"
    out = Path(f"results/constrained_replay_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    print(f"\nwrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["record", "replay"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    record(args.folder) if args.step == "record" else replay(args.folder, args.device)


if __name__ == "__main__":
    main()
