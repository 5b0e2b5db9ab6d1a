"""CPU fast-path decode in one process: plain and two SelfExtend settings, taking turns (two rounds).

Separate processes (``speed_memory.py``) read this 2-core machine's drift as differences between settings; here
the same loaded model runs plain, G2 W4096 (the table's setting below 8k) and G8 W2048 + log (shipped there
before) on the same 8,160-token prompt, one after the other, twice.  Prints one line per run and writes
``results/fast_decode_settings_cpu.json``.

    python benchmarks/fast_decode_settings.py 8160
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from speed_memory import run_one

import selfextend_llm
from selfextend_llm.tasks.passkey import passkey_prompt


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8160
    se = selfextend_llm.load(target_context=131072)
    ids = torch.tensor([se.encode(passkey_prompt(n + 64, 0.5, 0, se.count_tokens).text)[:n]])
    configs = {
        "plain": None,
        "G2 W4096": selfextend_llm.SelfExtendConfig(2, 4096),
        "G8 W2048 +log": selfextend_llm.SelfExtendConfig(8, 2048, log_scale=True),
    }
    rows = []
    for rnd in range(2):
        for name, config in configs.items():
            selfextend_llm.remove(se.model)
            if config is not None:
                selfextend_llm.apply(se.model, config)
            se.fast.enabled, se.fast.failed = True, None
            r = run_one(se, ids, 24)
            rows.append({"round": rnd, "setting": name, **{k: v for k, v in r.items() if k != "tokens"}})
            print(f"{rnd} {name:>14} prefill {r['prefill_s']:.1f} s decode {r['decode_tok_s']:.1f} tok/s", flush=True)
    out = Path("results/fast_decode_settings_cpu.json")
    out.write_text(json.dumps({"tokens": n, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
