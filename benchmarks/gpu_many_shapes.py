"""Many prompt lengths in one process on a GPU: the compiled fast path never crashes on dynamo's recompile limit.

Each static-cache bucket (four per doubling of the length) is its own compiled graph, and dynamo refuses the
ninth shape of a function under ``fullgraph`` with ``FailOnRecompileLimitHit`` (issue 32: ``generate`` raised it
after 8 shapes).  This runs ``--lengths`` prompts of different lengths (20 by default, spanning 20 buckets) through
``SelfExtendModel.complete`` on a small random Llama (SelfExtend G=8, W=64, trained 1024: reach ~7.7k) and checks
that every call answers, with the same greedy tokens as ``fast_generation=False``, and what the model reports
(``describe()["fast_generation"]``: still active, how often the compiled graphs were dropped).

    python benchmarks/gpu_many_shapes.py --tokenizer <folder with tokenizer.json>
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import transformers

from selfextend_llm import apply
from selfextend_llm.config import SelfExtendConfig
from selfextend_llm.generation import cache_bucket
from selfextend_llm.model import SelfExtendModel


def tiny(tokenizer, fast: bool, device: str) -> SelfExtendModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    lm = transformers.LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    lm.generation_config.eos_token_id = None  # run every requested token
    grouping = SelfExtendConfig(8, 64)
    apply(lm, grouping)
    return SelfExtendModel(
        lm, tokenizer, config=grouping, context_window=7700, name="tiny", fast_generation=fast, prefix_cache_bytes=0
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--lengths", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    fast, slow = tiny(tok, True, device), tiny(tok, False, device)
    words = "the sea and the sky were grey while a ship sailed past the harbour lights at dusk".split()
    lengths, n = [], 120
    while len(lengths) < args.lengths and n + args.new_tokens < 7600:  # one length per bucket
        if not lengths or cache_bucket(n + args.new_tokens) != cache_bucket(lengths[-1] + args.new_tokens):
            lengths.append(n)
        n = int(n * 1.12) + 1
    rows = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, length in enumerate(lengths):
            ids = [tok.convert_tokens_to_ids(tok.tokenize(" " + words[(i + j) % len(words)]))[0] for j in range(length)]
            prompt = tok.decode(ids)
            start = time.perf_counter()
            got = fast.complete(prompt, max_new_tokens=args.new_tokens)
            seconds = time.perf_counter() - start
            want = slow.complete(prompt, max_new_tokens=args.new_tokens)
            row = {
                "prompt_tokens": got.prompt_tokens, "bucket": cache_bucket(got.prompt_tokens + args.new_tokens),
                "seconds": round(seconds, 2), "path": fast.last_call["path"], "same_as_dynamic": got.text == want.text,
                "compile_resets": fast.fast.compile_resets,
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    described = fast.describe()["fast_generation"]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{name}: {len(rows)} lengths, {len({r['bucket'] for r in rows})} buckets, every call answered")
    print("| prompt tokens | bucket | seconds | path | same as dynamic cache | compile resets so far |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompt_tokens']} | {r['bucket']} | {r['seconds']} | {r['path']} | {r['same_as_dynamic']} | "
              f"{r['compile_resets']} |")  # fmt: skip
    print(f"fast path active at the end: {described['active']}; warnings: "
          f"{sorted({str(w.message)[:80] for w in caught})}")  # fmt: skip
    out = Path(args.out or f"results/gpu_many_shapes_{'cuda' if device == 'cuda' else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                               "rows": rows, "fast_generation": described}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
