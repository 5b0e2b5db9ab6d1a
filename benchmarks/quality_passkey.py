"""Pass-key quality grid: plain, dynamic NTK, YaRN and SelfExtend, each length its own results file.

    python benchmarks/quality_passkey.py --lengths 4096 8192 16384 32768 65536 --prompts 4 --depths 5

20 prompts per cell = 5 depths x 4 prompts. Writes results/passkey/<length>.json and, at the end,
results/passkey/summary.md and results/passkey/heatmap.png over all lengths found on disk.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import selfextend_llm
from selfextend_llm.evaluation import GridResult, Method, default_depths, passkey_grid, plot_heatmaps

DEFAULT_METHODS = ["plain", "dynamic-ntk", "yarn", "selfextend", "se:8,2048+log", "se:12,1024", "se:4,1024"]


def merge(folder: Path) -> GridResult | None:
    parts = [json.loads(p.read_text()) for p in sorted(folder.glob("[0-9]*.json"), key=lambda p: int(p.stem))]
    if not parts:
        return None
    methods = parts[0]["methods"]
    merged = GridResult("passkey", [], parts[0]["depths"], methods)
    for part in parts:
        n = part["lengths"][0]
        merged.lengths.append(n)
        for m in methods:
            merged.accuracy.setdefault(m, {})[n] = part["accuracy"][m][str(n)]
    return merged


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--gguf-file")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--depths", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out-dir", default="results/passkey")
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    se = selfextend_llm.load(args.model, gguf_file=args.gguf_file, dtype=args.dtype)
    methods = [Method.parse(m) for m in args.methods]
    for n in args.lengths:
        result = passkey_grid(se, [n], default_depths(args.depths), methods, args.prompts, batch_size=args.batch_size)
        data = result.to_json()
        data.pop("samples")
        (out / f"{n}.json").write_text(json.dumps(data, indent=1))
        print(result.table(), flush=True)
    merged = merge(out)
    (out / "summary.md").write_text(merged.table())
    plot_heatmaps(merged, out / "heatmap.png")
    print(merged.table())


if __name__ == "__main__":
    main()
