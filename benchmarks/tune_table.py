"""The embedded default's shipped table, rebuilt from the saved tuning runs, with its grid and heatmaps.

The runs themselves (GPU, 20 prompts a cell for every finalist and baseline)::

    selfextend-llm tune --model SmolLM2-135M-Instruct.Q4_1.gguf --lengths 4096 8192 16384 32768 65536 \\
        --prompts 4 --depths 5 --out-dir results/tune/lengths
    selfextend-llm tune ... --lengths 131072 --tasks passkey --keep 2 --baselines dynamic-ntk
    selfextend-llm tune ... --lengths 16384 --screen 4 --baselines --candidates se:12,1024 se:9,1024 ...

This script merges every JSON under the model's run folders of ``results/tune/`` (:data:`RUNS`) length
by length and task by task (where two runs measured the same setting on a task, the one on more prompts
counts), chooses each length's main and chat settings by the search's own rules (:func:`choose`; inside the
trained window only among settings within 0.01 of plain's perplexity on every text of the guard measured
there, ``round7/perplexity_8192.json``: the search's :class:`~selfextend_llm.search.PerplexityGuard`), and writes:

* ``selfextend_llm/tables/SmolLM2-135M-Instruct.json`` (``--write-table``): what ``load()`` ships;
* ``results/tune/summary.md``: the chosen setting against plain, dynamic NTK and YaRN per length;
* ``results/tune/heatmap.png``: every measured setting x length, one panel per task;
* ``results/tune/log_strength.png``: accuracy against the strength of log-scaled queries, per grouping.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from selfextend_llm.evaluation import Method, _pyplot
from selfextend_llm.search import LengthResult, build_table
from selfextend_llm.tuning import TableEntry, TunedTable

MODEL, TRAINED = "SmolLM2-135M-Instruct", 8192
#: Entries set by hand over the search's choice, each with why (none now).  Until round 6, (8k, 16k] held
#: G12 W1024 by hand: the search's raw-prompt choices there missed the pass key of the LangChain agent example
#: (chat template, ~10k tokens, tests/.../test_whole_document.py).  The chat task and the table's chat entries
#: now measure and serve that case (the 12k chat entry, G8 W256, finds it), so the search decides everywhere.
OVERRIDES: dict[int, str] = {}
BASELINES = ["plain", "dynamic-ntk", "yarn"]
#: The folders under ``results/tune/`` that hold this model's runs (others, e.g. ``gemma3_270m/``, are
#: other models' and must not be merged into its table).
RUNS = ("lengths", "extra", "round3", "round4", "round5", "round6", "round7", "round8")  # round9: families
#: The tasks measured for the table: the chat pass key (asked through the chat template, the way LangChain,
#: LlamaIndex and the server ask) ranks the table's chat entries past the trained window (search.chat_tasks).
TABLE_TASKS = ("passkey", "needle", "chat")
FULL = 20  # prompts a cell for a finalist


def measured_tasks(result: LengthResult) -> list[str]:
    """The tasks of :data:`TABLE_TASKS` on which some setting at this length was measured on :data:`FULL` prompts."""
    return [
        t
        for t in TABLE_TASKS
        if any(m.startswith("se:") and counts.get(t, 0) >= FULL for m, counts in result.prompts.items())
    ]


def choose(result: LengthResult) -> None:
    """Set the length's main and chat choices by the rule these rounds were run with (the mean first), over
    the merged runs.  Re-ranking them worst-first on their one pass-key wording picks the narrow windows that
    round 9 found overfit (32k: G16 W256 over G7 W2048 +log); only the families fix that, length by length."""
    result.rule = "mean"
    result.choose_entries(FULL, measured_tasks(result), TRAINED)
    result.best = OVERRIDES.get(result.length) or result.best


def merged_results(folder: Path) -> list[LengthResult]:
    by_length: dict[int, LengthResult] = {}
    for path in sorted(p for run in RUNS for p in (folder / run).rglob("*.json")):
        data = json.loads(path.read_text())
        if "accuracy" not in data or "length" not in data:
            continue  # a table file, not a per-length result
        result = LengthResult.from_json(data)
        result.best = ""
        by_length[result.length] = by_length[result.length].merged(result) if result.length in by_length else result
    return [by_length[n] for n in sorted(by_length)]


def summary(results: list[LengthResult]) -> str:
    tasks = list(TABLE_TASKS)
    head = "| length | chosen setting | " + " | ".join(f"chosen {t}" for t in tasks) + " | chat prompts: setting | chat"
    head += " | " + " | ".join(f"{b} {t}" for b in BASELINES for t in tasks) + " | perplexity over plain (worst text) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for result in results:
        best = result.best

        def cell(method: str, task: str, result: LengthResult = result) -> str:
            value = result.accuracy.get(method, {}).get(task)
            return "" if value is None else f"{value:.2f}"

        setting = _spelled(best)
        if result.length in OVERRIDES:
            setting += " (by hand, see OVERRIDES)"
        chosen = [f"**{cell(best, t)}**" if cell(best, t) else "" for t in tasks]
        row = f"| {result.length:,} | {setting} | " + " | ".join(chosen)
        chat = result.best_chat or best
        row += f" | {_spelled(chat)}{'' if result.best_chat else ' (main)'} | {cell(chat, 'chat')}"
        row += " | " + " | ".join(cell(b, t) for b in BASELINES for t in tasks) + f" | {_over_plain(result, best)} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def _over_plain(result: LengthResult, method: str) -> str:
    """The perplexity guard's worst margin over plain for ``method`` ("" where no guard ran)."""
    base, mine = result.perplexity.get("plain"), result.perplexity.get(method)
    if not base or not mine:
        return ""
    return f"{max(mine[t] - base[t] for t in base):+.3f} ({len(base)} texts)"


def _spelled(method: str) -> str:
    cfg = Method.parse(method).config
    return method if cfg is None else cfg.label


def heatmap(results: list[LengthResult], path: Path) -> Path:
    plt = _pyplot()
    tasks = list(TABLE_TASKS)

    def order(method: str) -> tuple:
        cfg = Method.parse(method).config
        return (0, method, 0, 0) if cfg is None else (1, cfg.neighbor_window, cfg.group_size, cfg.log_scale)

    methods = sorted({m for r in results for m in r.accuracy}, key=order)
    lengths = [r.length for r in results]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 0.32 * len(methods) + 2), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=True):
        grid = [[r.accuracy.get(m, {}).get(task, float("nan")) for r in results] for m in methods]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, m in enumerate(methods):
            for j, r in enumerate(results):
                value = grid[i][j]
                if value == value:  # not NaN
                    chosen = m == (r.best_chat or r.best) if task == "chat" else m == r.best
                    weight = "bold" if chosen else "normal"
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, fontweight=weight)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths], fontsize=8)
        ax.set_yticks(range(len(methods)), methods, fontsize=7)
        title = (
            f"{task}: bold = the table's choice (chat: its chat entry), blank = not run\n(screened out: 5-10 prompts)"
        )
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def strength_plot(results: list[LengthResult], path: Path, least: int = 3) -> Path:
    """Accuracy against the strength of log-scaled queries, one line per length and grouping measured at
    ``least`` strengths or more; points measured on fewer than :data:`FULL` prompts are hollow."""
    plt = _pyplot()
    lines: dict[tuple[int, int, int], dict[float, str]] = {}
    for result in results:
        for method in result.accuracy:
            cfg = Method.parse(method).config
            if cfg is not None:
                key = (result.length, cfg.group_size, cfg.neighbor_window)
                lines.setdefault(key, {})[cfg.log_scale] = method
    lines = {k: v for k, v in lines.items() if len(v) >= least}
    by_length = {r.length: r for r in results}
    tasks = list(TABLE_TASKS)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False, sharey=True)
    for ax, task in zip(axes.flat, tasks, strict=True):
        for (length, group, window), methods in sorted(lines.items()):
            result = by_length[length]
            points = sorted(
                (s, result.accuracy[m][task], result.prompts[m][task] >= FULL)
                for s, m in methods.items()
                if task in result.accuracy[m]
            )
            if len(points) < 2:
                continue
            (line,) = ax.plot(
                [p[0] for p in points], [p[1] for p in points], label=f"{length // 1024}k G{group} W{window}"
            )
            for s, acc, full in points:
                ax.plot([s], [acc], "o", color=line.get_color(), fillstyle="full" if full else "none")
        ax.set_xlabel("log strength (0: off, 1: LongLM's log(pos)/log(L))")
        ax.set_title(task)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("accuracy (hollow: 5-10 prompts)")
    axes.flat[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: Lengths whose main and chat entries round 9 (every task family, ranked by the worst one-fact family;
#: ``benchmarks/tune_families.py``) chose, replacing rounds 1-8's: at 64k G16 W2048 +log0.5 is at or above both
#: entries it replaces on every family, on the same 24 prompts (16/24 found against 13/24 for G32 W4096 +log0.5
#: and 6/24 for G24 W256 +log0.25; BENCHMARKS.md, issue 34).
ROUND9 = {65536: "se:16,2048+log0.5"}


def with_round9(table: TunedTable, folder: Path) -> TunedTable:
    """``table`` with :data:`ROUND9`'s lengths set to round 9's choice, its accuracy from round 9's journal
    (selection split, and the held-out split where it was validated)."""
    cells = [json.loads(line) for line in (folder / "cells.jsonl").read_text().splitlines() if line.strip()]

    def accuracy(method: str, n: int, held: bool) -> dict[str, float]:
        hits: dict[str, list[bool]] = {}
        for c in cells:
            if c["method"] == method and c["length"] == n and c["task"].startswith("heldout/") == held:
                hits.setdefault(c["task"], []).append(c["hit"])
        return {t: round(sum(h) / len(h), 4) for t, h in hits.items()}

    def replaced(entries: list[TableEntry]) -> list[TableEntry]:
        out = []
        for e in entries:
            if e.upto in ROUND9:
                m = ROUND9[e.upto]
                e = TableEntry(e.upto, Method.parse(m).config, accuracy(m, e.upto, False), accuracy(m, e.upto, True))
            out.append(e)
        return out

    measured = {**table.measured, "round9": {str(n): m for n, m in ROUND9.items()}}
    entries, chat = replaced(table.entries), replaced(table.chat_entries)
    return TunedTable(table.model, table.pretrained_context, entries, measured, chat_entries=chat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results/tune")
    ap.add_argument("--write-table", action="store_true", help="update the shipped table in the package")
    args = ap.parse_args()
    folder = Path(args.results)
    results = merged_results(folder)
    for result in results:
        choose(result)
    measured = {
        "tasks": list(TABLE_TASKS),
        "prompts_per_cell": 20,
        "device": "NVIDIA H200 (rounds 1-7), NVIDIA H100 (round 8)",
        "dtype": "bfloat16",
        "note": "entries ranked on pass key and needle, chat entries (past the window) on the chat pass key, "
        "then the others; each length on the tasks measured there; see BENCHMARKS.md (issue 17)",
        "measured_tasks": {str(r.length): measured_tasks(r) for r in results},
        "perplexity_guard": {
            str(r.length): {"tolerance": r.perplexity_tolerance, "texts": sorted(r.perplexity.get("plain", {}))}
            for r in results
            if r.perplexity_tolerance is not None
        },
    }
    measured["overrides"] = {str(n): m for n, m in OVERRIDES.items()}
    table = build_table(MODEL, TRAINED, results, measured)
    table = with_round9(table, folder / "round9")
    text = summary(results)
    (folder / "summary.md").write_text(text)
    png = heatmap(results, folder / "heatmap.png")
    strengths = strength_plot(results, folder / "log_strength.png")
    print(text)
    print(f"summary: {folder / 'summary.md'}  heatmap: {png}  log strengths: {strengths}")
    if args.write_table:
        out = table.save(Path(__file__).resolve().parents[1] / "selfextend_llm" / "tables" / f"{MODEL}.json")
        print(f"table: {out}")


if __name__ == "__main__":
    main()
