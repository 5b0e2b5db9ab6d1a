"""Quality grids (pass key, RULER-style multi-key needle): plain, dynamic NTK, YaRN and SelfExtend.

    python benchmarks/quality_grid.py --task passkey --lengths 4096 8192 16384 32768 65536 --prompts 4 --depths 5
    python benchmarks/quality_grid.py --task needle --lengths 4096 8192 16384 32768 --prompts 4 --depths 5

20 prompts per cell = 5 depths x 4 prompts. Each length is written as results/<task>/<length>.json as soon
as it is done (a long run that is cut off keeps what it finished); at the end results/<task>/summary.md
and results/<task>/heatmap.png cover all lengths found on disk.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import selfextend_llm
from selfextend_llm.evaluation import GridResult, Method, default_depths, plot_heatmaps, task_grid

DEFAULT_METHODS = ["plain", "dynamic-ntk", "yarn", "selfextend", "se:8,2048+log", "se:12,1024", "se:4,1024"]


def merge(folder: Path, task: str) -> GridResult | None:
    parts = [json.loads(p.read_text()) for p in sorted(folder.glob("[0-9]*.json"), key=lambda p: int(p.stem))]
    if not parts:
        return None
    methods = parts[0]["methods"]
    merged = GridResult(task, [], parts[0]["depths"], methods)
    for part in parts:
        n = part["lengths"][0]
        merged.lengths.append(n)
        for m in methods:
            merged.accuracy.setdefault(m, {})[n] = part["accuracy"][m][str(n)]
    return merged


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["passkey", "needle"], default="passkey")
    ap.add_argument("--model")
    ap.add_argument("--gguf-file")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--depths", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out-dir", help="default: results/<task>")
    args = ap.parse_args()
    out = Path(args.out_dir or f"results/{args.task}")
    out.mkdir(parents=True, exist_ok=True)
    se = selfextend_llm.load(args.model, gguf_file=args.gguf_file, dtype=args.dtype)
    methods = [Method.parse(m) for m in args.methods]
    for n in args.lengths:
        result = task_grid(
            se, args.task, [n], default_depths(args.depths), methods, args.prompts, batch_size=args.batch_size
        )
        data = result.to_json()
        data.pop("samples")
        (out / f"{n}.json").write_text(json.dumps(data, indent=1))
        print(result.table(), flush=True)
    merged = merge(out, args.task)
    (out / "summary.md").write_text(merged.table())
    plot_heatmaps(merged, out / "heatmap.png")
    print(merged.table())


if __name__ == "__main__":
    main()
