"""The embedded default's long lengths re-tuned on every task family, ranked by the worst, checked held out.

One model load, one ``search.tune`` per length with that length's candidates (a few groupings around what
earlier rounds found, and what the shipped table runs, so the new choice is compared with the old one on
the same held-out prompts), the baselines (dynamic NTK, YaRN) on the held-out split beside them::

    PYTHONPATH=. python benchmarks/tune_families.py --device cuda --out-dir results/tune/round9

Every prompt's outcome is journalled in ``--out-dir`` (``cells.jsonl``) and every finished length written
there (``<length>.json``), so a run cut off by a time limit resumes where it stopped.  Prints the report
(selection split, held-out split, baselines) and writes ``summary.md`` beside the per-length results;
``--write-table`` then rebuilds the shipped table: its entries inside the trained window kept, the
lengths tuned here replacing every entry past it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from selfextend_llm.evaluation import Method
from selfextend_llm.search import LengthResult, build_table, report
from selfextend_llm.tuning import SHIPPED_DIR, TunedTable

MODEL = "SmolLM2-135M-Instruct"
#: Candidates per length: windows of 1/32 to 1/2 of the 8k window, each with a G near the smallest that
#: reaches the length, at log strengths earlier rounds found best there, and what the shipped table ran.
CANDIDATES: dict[int, list[str]] = {
    16384: ["se:6,256", "se:12,512", "se:4,1024", "se:3,2048", "se:4,2048+log0.5", "se:4,4096", "se:6,4096"],
    32768: [
        "se:7,2048+log",
        "se:16,256",
        "se:8,4096+log0.5",
        "se:12,4096",
        "se:6,1024+log0.5",
        "se:10,2048",
        "se:16,512+log0.5",
    ],  # fmt: skip
    65536: [
        "se:32,4096+log0.5",
        "se:24,256+log0.25",
        "se:16,4096+log0.5",
        "se:24,4096",
        "se:16,2048+log0.5",
        "se:12,1024+log0.5",
        "se:24,2048",
    ],  # fmt: skip
    131072: ["se:48,256+log0.5", "se:32,4096+log0.5", "se:48,4096+log0.5", "se:32,2048+log0.5", "se:24,1024+log0.5"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072, 32768, 16384])
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--depths", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2, help="prompts a depth for finalists (selection split)")
    ap.add_argument("--validate", type=int, default=3, help="prompts a depth on the held-out split")
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out-dir", default="results/tune/round9")
    ap.add_argument("--deadline-s", type=float, default=None, help="start no new length after this many seconds")
    ap.add_argument(
        "--also-validate", nargs="*", default=None,
        help="settings validated beside the choice (default: what the shipped table runs at that length)",
    )  # fmt: skip
    ap.add_argument("--write-table", action="store_true", help="rebuild the shipped table from --out-dir only")
    args = ap.parse_args()
    out = Path(args.out_dir)
    if args.write_table:
        write_table(out)
        return

    import selfextend_llm
    from selfextend_llm import search

    start = time.perf_counter()
    se = selfextend_llm.load(device=args.device, dtype=args.dtype, target_context=max(args.lengths) + 64)
    results: list[LengthResult] = []
    for n in args.lengths:
        if args.deadline_s is not None and time.perf_counter() - start > args.deadline_s:
            print(f"deadline: {n} not started (rerun to resume)")
            break
        settings = [Method.parse(m).config for m in CANDIDATES[n]]
        _, (result,) = search.tune(
            se, [n], settings=settings, depths=args.depths, prompts=args.prompts, screen=1, keep=args.keep,
            baselines=["dynamic-ntk", "yarn"], validate=args.validate, batch_size=args.batch_size, out_dir=out,
            also_validate=args.also_validate,
        )  # fmt: skip
        results.append(result)
        print(f"{n}: {result.best} / chat {result.best_chat or result.best} ({result.seconds:.0f} s)", flush=True)
    text = report(sorted(results, key=lambda r: r.length))
    print(text)
    (out / "summary.md").write_text(
        f"# {MODEL}: families, ranked by the worst, held-out split ({se.device}, {args.dtype})\n\n{text}\n"
    )


def write_table(out: Path) -> None:
    """The shipped table with every entry past the window replaced by this run's lengths."""
    path = SHIPPED_DIR / f"{MODEL}.json"
    old = TunedTable.from_json(json.loads(path.read_text()))
    trained = old.pretrained_context
    results = [
        LengthResult.from_json(json.loads(p.read_text()))
        for p in sorted(out.glob("*.json"), key=lambda p: int(p.stem))
        if p.stem.isdigit()
    ]
    new = build_table(MODEL, trained, results)
    keep = [e for e in old.entries if e.upto <= trained]
    keep_chat = [e for e in old.chat_entries if e.upto <= trained]
    measured = {
        **old.measured,
        "families": {
            "lengths": [r.length for r in results],
            "ranked_on": "worst selection family (search.LengthResult.rank_key)",
            "held_out": sorted({t for r in results for m in r.accuracy for t in r.held_out(m)}),
            "runs": str(out),
        },
    }
    table = TunedTable(MODEL, trained, keep + new.entries, measured=measured, chat_entries=keep_chat + new.chat_entries)
    table.save(path)
    print(f"wrote {path}; quality_context {table.quality_context()}; quality {table.quality()}")


if __name__ == "__main__":
    main()
