"""Tuning G and W for any model: a joint search over task families, length by length, checked on a held-out split.

The best grouping changes with the prompt length, and a setting tuned on one task alone picks
what only knows that task (on the embedded default, a G that is perfect on pass keys fails
multi-key needles; the table tuned on one pass-key wording claimed 0.80 at 128k where pass keys
worded otherwise were found 0.00 of the time).  So each length is searched on every family of
:mod:`selfextend_llm.tasks.families` at once (filler and prose haystacks, one key and several,
raw and through the chat template), and a setting is ranked by its *worst* family, not its mean: a
setting that aces one wording and misses another is not chosen over one that finds both.  The search
runs in two stages, like successive halving: every candidate on a few prompts (one per depth), then
the best few on the full set of prompts, the prompts of the first stage included (same seeds, not
re-run).  Then the chosen settings and the baselines (dynamic NTK, YaRN) run on the *held-out* split
(other wordings, fillers, passages, instructions and key names; :func:`held_out_twins`), which no
choice ever looks at: that, not the search's own score, is the quality a table advertises.

The result is a :class:`~selfextend_llm.tuning.TunedTable`: one entry per length, each covering
the lengths from the previous one up to its own, and each checked to reach its whole range.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import LOG_STRENGTHS, MAX_MEASURED_GROUP, PERPLEXITY_TOLERANCE, SelfExtendConfig
from .evaluation import (
    FAMILIES,
    HELD_OUT,
    TASKS,
    Method,
    check_tasks,
    default_depths,
    default_perplexity_text,
    generate_raw,
    is_held_out,
    perplexity,
    using,
)
from .model import SelfExtendModel
from .tuning import TableEntry, TunedTable, shipped_table

#: New tokens a call may add beyond the measured prompt length; a candidate must reach both.
ANSWER_MARGIN = 16


def method_name(config: SelfExtendConfig | None) -> str:
    """The :class:`~selfextend_llm.evaluation.Method` spelling of a setting (``plain`` for None)."""
    if config is None:
        return "plain"
    return f"se:{config.group_size},{config.neighbor_window}{config.log_suffix}"


def default_tasks(se: SelfExtendModel) -> list[str]:
    """Every family of the selection split; the chat forms only where the model has a chat template (how
    chat frameworks and the server ask; on the embedded default the raw-prompt tasks alone chose settings
    that missed chat questions: 0.25 at 12k, against 0.95 for the best setting measured with them)."""
    chat = bool(getattr(se.tokenizer, "chat_template", None))
    return [f for f in FAMILIES if chat or not TASKS[f].needs_chat_template]


def held_out_twins(tasks: Sequence[str]) -> list[str]:
    """The held-out split's twin of every family among ``tasks`` (``prose-key`` -> ``heldout/prose-key``);
    the older single tasks (``passkey``, ``needle``, ``chat``) have none."""
    return [HELD_OUT + t for t in tasks if HELD_OUT + t in TASKS]


def raw_tasks(tasks: Sequence[str]) -> list[str]:
    """The tasks a length's main entry (raw prompts) is ranked on: all but the chat pass key (unless it
    is the only task)."""
    return [t for t in tasks if not TASKS[t].needs_chat_template] or list(tasks)


def chat_tasks(tasks: Sequence[str], length: int, trained: int) -> list[str] | None:
    """The tasks a length's chat entry is ranked on: the chat tasks; None when
    ``tasks`` has no chat task or the prompt fits the trained window.  Inside it the model's own
    positions are exact and the table must keep plain's perplexity, and the settings that find chat
    pass keys there (windows of 256 tokens on the embedded default, whose plain chat pass key is 0.15
    at 4k) group almost the whole prompt; chat calls there take the main entry."""
    chat = [t for t in tasks if TASKS[t].needs_chat_template]
    if not chat or length <= trained:  # a prompt of the whole window: its answer's few tokens are past it
        return None
    return chat


def candidates(
    trained: int, length: int, *, log: str = "on", strengths: Sequence[float] = LOG_STRENGTHS
) -> list[SelfExtendConfig | None]:
    """Settings worth trying at ``length`` tokens on a model trained on ``trained``.

    Inside the window: plain and a few groupings with a wide neighbor window, 1/4 to 7/8 of it (grouping
    there can help a model that is weak at its own edge, as the embedded default is; the widest keep
    plain's perplexity best, which the guard asks for there).  Beyond it: windows of
    1/32, 1/16, 1/8, 1/4 and 1/2 of the trained window, each with the smallest group size that
    reaches the length and 1.5x, 2x, 3x and 4x that (on the embedded default the wide windows' best
    at 32k and 64k sat at 1.3x-1.5x the smallest; the small windows', the best on the chat pass key
    at 12k-32k, at 3x-4x: larger G keeps grouped positions farther from the window's edge).
    ``log``: "on" (log-scaled queries beyond the window, at each of ``strengths``), "off" or "both" (without
    and at each strength).
    """
    if log not in ("on", "off", "both"):
        raise ValueError(f"log must be 'on', 'off' or 'both', got {log!r}")
    if not strengths or not all(isinstance(s, (int, float)) and 0 < s < math.inf for s in strengths):
        raise ValueError(
            f"log strengths must be positive numbers (1: LongLM's scaling), got {list(strengths)!r}; "
            "for no log scaling use log='off' (--log off), for both log='both'"
        )
    need = length + ANSWER_MARGIN
    windows = sorted({w for w in (trained // 32, trained // 16, trained // 8, trained // 4, trained // 2) if w >= 16})
    out: list[SelfExtendConfig | None] = []
    if length <= trained:  # the prompt fits: plain can run it (the answer's few tokens past the edge included)
        out.append(None)
        # wide windows (3/4, 7/8 of the window) too: they move perplexity least, what the guard asks there
        wide = ((2, 3 * trained // 4), (2, 7 * trained // 8), (3, 7 * trained // 8))
        for group, window in ((2, trained // 2), (4, trained // 2), (4, trained // 4), (8, trained // 4), *wide):
            if 16 <= window < need:  # a window holding the whole call is exactly plain
                out.append(SelfExtendConfig(group, window))
        return list(dict.fromkeys(out))
    logs = {"on": list(strengths), "off": [0.0], "both": [0.0, *strengths]}[log]
    for window in windows:
        smallest = math.ceil((need - window) / (trained - window))
        for group in sorted({smallest, math.ceil(1.5 * smallest), 2 * smallest, 3 * smallest, 4 * smallest}):
            if group > MAX_MEASURED_GROUP:
                continue
            for strength in logs:
                cfg = SelfExtendConfig(group, window, log_scale=strength)
                if cfg.max_context(trained) >= need:
                    out.append(cfg)
    return out


@dataclass
class LengthResult:
    """Accuracy per method and task at one length; ``prompts[method][task]`` how many prompts ran.

    ``best``: the choice for raw prompts; ``best_chat``: for prompts through the chat template, where
    it was ranked apart (see :func:`chat_tasks`), else empty.
    """

    length: int
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    prompts: dict[str, dict[str, int]] = field(default_factory=dict)
    best: str = ""
    seconds: float = 0.0
    best_chat: str = ""
    #: ``perplexity[method][text]`` inside the trained window (the guard, :class:`PerplexityGuard`).
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)
    #: The guard's tolerance over plain; None where no guard ran (past the window, or turned off).
    perplexity_tolerance: float | None = None
    #: How settings are ranked (:meth:`rank_key`): ``"worst"`` (the worst one-fact task first, this
    #: search's rule) or ``"mean"`` (the mean first: the rule rounds 1-8 of the shipped table were
    #: chosen by, kept so that ``benchmarks/tune_table.py`` rebuilds what they chose).
    rule: str = "worst"

    def keeps_perplexity(self, method: str) -> bool:
        """Whether ``method`` passes the length's perplexity guard: no guard ran here, or it was measured
        on every text of the guard and is within the tolerance of plain on each.  A setting the guard
        did not measure does not pass (nothing unmeasured is chosen where the guard ran)."""
        if self.perplexity_tolerance is None or "plain" not in self.perplexity or method == "plain":
            return True
        base, mine = self.perplexity["plain"], self.perplexity.get(method, {})
        return all(t in mine and mine[t] <= base[t] + self.perplexity_tolerance for t in base)

    def score(self, method: str, tasks: Sequence[str] | None = None) -> float:
        """Mean accuracy over ``tasks`` (default: every selection task ``method`` has), rounded so that
        ties are ties."""
        values = self._values(method, tasks)
        return round(sum(values) / len(values), 6)

    def worst(self, method: str, tasks: Sequence[str] | None = None) -> float:
        """The lowest accuracy over ``tasks`` (default: every selection task ``method`` has): the search's
        objective."""
        return round(min(self._values(method, tasks)), 6)

    def _values(self, method: str, tasks: Sequence[str] | None) -> list[float]:
        measured = self.accuracy[method]
        if tasks is None:  # the held-out split is never part of a choice
            return [v for t, v in measured.items() if not is_held_out(t)]
        return [measured[t] for t in tasks]

    def held_out(self, method: str) -> dict[str, float]:
        """What ``method`` scored on the held-out split (task -> accuracy; empty where it was not validated)."""
        return {t: v for t, v in self.accuracy.get(method, {}).items() if is_held_out(t)}

    def rank_key(self, method: str, tasks: Sequence[str] | None = None) -> tuple:
        """Sort key, best first: the worst one-fact task (a setting that aces one wording and misses another
        overfits: the embedded default's old table did, 0.80 on its own pass key at 128k and 0.00 on
        others; one fact in a long document is what whole-document chains ask, and what the table's
        advertised quality is measured on); then the worst task of all (multi-key needles); then the mean;
        then the first task; then plain, the wider window, the smaller G."""
        names = list(tasks) if tasks is not None else [t for t in self.accuracy[method] if not is_held_out(t)]
        if self.rule == "mean":  # rounds 1-8: the mean, then the first task, then the weaker one
            values = self._values(method, names)
            return (-self.score(method, names), -values[0], -min(values), _preference(Method.parse(method).config))
        if self.rule != "worst":
            raise ValueError(f"rank rule must be 'worst' or 'mean', got {self.rule!r}")
        one_fact = [t for t in names if TASKS[t].one_fact] if all(t in TASKS for t in names) else []
        values = self._values(method, names)
        worst_fact = self.worst(method, one_fact) if one_fact else self.worst(method, names)
        return (
            -worst_fact, -self.worst(method, names), -self.score(method, names), -values[0],
            _preference(Method.parse(method).config),
        )  # fmt: skip

    def choose(self, full: int, tasks: Sequence[str] | None = None) -> str:
        """The best SelfExtend setting (or plain) among those measured on ``full`` prompts per task.

        ``tasks``: rank on these and consider only the settings measured on all of them (merged runs
        measured different settings on different tasks; a mean over fewer tasks is not comparable).
        None: every setting on the tasks it has (one run: all the same).
        """

        def finalist(m: str) -> bool:
            counts = {t: c for t, c in self.prompts[m].items() if not is_held_out(t)}
            wanted = counts if tasks is None else {t: counts.get(t, 0) for t in tasks}
            if not wanted:
                return False
            return (m == "plain" or m.startswith("se:")) and min(wanted.values()) >= full

        measured = [m for m in self.accuracy if finalist(m)]
        finalists = [m for m in measured if self.keeps_perplexity(m)]
        if not finalists:
            on = "" if tasks is None else f" on every task of {', '.join(tasks)}"
            kept = f" and within the perplexity guard ({', '.join(measured)} are above it)" if measured else ""
            raise ValueError(f"no setting was measured on {full} prompts{on}{kept} at {self.length} tokens")
        return min(finalists, key=lambda m: self.rank_key(m, tasks))

    def choose_entries(self, full: int, tasks: Sequence[str], trained: int) -> None:
        """Set :attr:`best` (ranked on :func:`raw_tasks`) and :attr:`best_chat` (on :func:`chat_tasks`,
        empty where it does not apply) from the settings measured on ``full`` prompts."""
        chat = chat_tasks(tasks, self.length, trained)
        if chat is not None and self.rule == "mean":  # rounds 1-8 broke chat ties on the other tasks
            chat += [t for t in tasks if t not in chat]
        self.best = self.choose(full, raw_tasks(tasks))
        self.best_chat = self.choose(full, chat) if chat is not None else ""

    def merged(self, other: LengthResult) -> LengthResult:
        """Both runs' measurements at this length, task by task; where both measured a method on a
        task, the measurement on more prompts."""
        if other.length != self.length:
            raise ValueError(f"cannot merge results at {self.length} and {other.length} tokens")
        accuracy = {m: dict(a) for m, a in self.accuracy.items()}
        prompts = {m: dict(p) for m, p in self.prompts.items()}
        for method, measured in other.accuracy.items():
            acc, counts = accuracy.setdefault(method, {}), prompts.setdefault(method, {})
            for task, value in measured.items():
                if other.prompts[method][task] > counts.get(task, 0):
                    acc[task], counts[task] = value, other.prompts[method][task]
        ppl = {m: dict(by_text) for m, by_text in self.perplexity.items()}
        for method, by_text in other.perplexity.items():
            ppl.setdefault(method, {}).update(by_text)
        tolerance = self.perplexity_tolerance if self.perplexity_tolerance is not None else other.perplexity_tolerance
        return LengthResult(
            self.length, accuracy, prompts, "", self.seconds + other.seconds, perplexity=ppl,
            perplexity_tolerance=tolerance, rule=self.rule,
        )  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> LengthResult:
        return cls(
            int(data["length"]), data["accuracy"], data["prompts"], data.get("best", ""), data["seconds"],
            data.get("best_chat", ""), data.get("perplexity", {}), data.get("perplexity_tolerance"),
        )  # fmt: skip

    def to_json(self) -> dict:
        return {
            "length": self.length,
            "best": self.best,
            **({"best_chat": self.best_chat} if self.best_chat else {}),
            "accuracy": self.accuracy,
            "prompts": self.prompts,
            "seconds": round(self.seconds, 1),
            **({"perplexity": self.perplexity} if self.perplexity else {}),
            **({"perplexity_tolerance": self.perplexity_tolerance} if self.perplexity_tolerance is not None else {}),
        }


def _dtype_name(se: SelfExtendModel) -> str:
    """The weights' dtype as the table and the journal record it ("bfloat16", "float32")."""
    return str(next(se.model.parameters()).dtype).replace("torch.", "")


#: File in ``out_dir`` where :class:`_Runner` appends every prompt's outcome as it is scored.
JOURNAL = "cells.jsonl"


class _Runner:
    """Runs (method, task, length, depth, prompt index) cells once each and remembers the outcome.

    With a ``journal`` file, every batch's outcomes are appended (and flushed) as soon as they are
    scored, and the outcomes already there are read back first: a search killed in the middle of a
    length (a time limit, a lost machine) loses at most one batch, not the length's whole search.
    Lines are keyed by model, device kind, dtype, seed and depth too, so a journal shared by runs with other
    settings is never mixed up with this one.
    """

    def __init__(
        self, se: SelfExtendModel, depths: Sequence[float], seed: int, batch_size: int, bar,
        journal: str | Path | None = None,
    ) -> None:  # fmt: skip
        self.se, self.depths, self.seed, self.batch_size, self.bar = se, list(depths), seed, batch_size, bar
        self.done: dict[tuple[str, str, int, int, int], bool] = {}
        self.unshown: set[tuple[str, str, int, int, int]] = set()  # read back, not yet counted on the bar
        self.journal = Path(journal) if journal is not None else None
        self._run_key = {
            "model": se.model_name,
            "device": se.device.type,
            "dtype": _dtype_name(se),
            "seed": seed,
        }
        self.resumed = self._read_journal()

    def _read_journal(self) -> int:
        """Outcomes of this run's cells already in the journal (a torn last line is skipped)."""
        if self.journal is None or not self.journal.is_file():
            return 0
        depth_index = {round(d, 6): di for di, d in enumerate(self.depths)}
        for line in self.journal.read_text().splitlines():
            try:
                cell = json.loads(line)
            except json.JSONDecodeError:
                continue  # the process died while writing this line
            if any(cell.get(k) != v for k, v in self._run_key.items()):
                continue
            di = depth_index.get(round(cell["depth"], 6))
            if di is not None:
                key = (cell["method"], cell["task"], cell["length"], di, cell["prompt"])
                self.done[key] = bool(cell["hit"])
                self.unshown.add(key)
        return len(self.unshown)

    def _write_journal(self, cells: list[tuple[str, str, int, int, int]]) -> None:
        if self.journal is None:
            return
        lines = [
            json.dumps({
                **self._run_key, "method": m, "task": t, "length": n, "depth": round(self.depths[di], 6),
                "prompt": i, "hit": self.done[(m, t, n, di, i)],
            })
            for m, t, n, di, i in cells
        ]  # fmt: skip
        with self.journal.open("a") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()

    def run(self, method: Method, task: str, length: int, per_depth: int) -> float:
        """Accuracy of ``method`` on the first ``per_depth`` prompts of every depth (seeds as :func:`task_grid`)."""
        spec = TASKS[task]
        cells = [(method.name, task, length, di, i) for di in range(len(self.depths)) for i in range(per_depth)]
        todo = [cell[3:] for cell in cells if cell not in self.done]
        resumed = self.unshown.intersection(cells)
        self.unshown -= resumed
        self.bar.update(len(resumed))  # read back from the journal: the bar's total counts them
        if todo:
            with using(self.se, method, length + ANSWER_MARGIN, chat=spec.needs_chat_template):
                for b0 in range(0, len(todo), self.batch_size):
                    batch = todo[b0 : b0 + self.batch_size]
                    items = [spec.make(self.se, length, self.depths[di], self.seed + 1000 * di + i) for di, i in batch]
                    answers = generate_raw(self.se, [text for text, _ in items], spec.new_tokens)
                    for (di, i), (_, expected), answer in zip(batch, items, answers, strict=True):
                        self.done[(method.name, task, length, di, i)] = expected in answer
                    self._write_journal([(method.name, task, length, di, i) for di, i in batch])
                    self.bar.update(len(batch))
        hits = [self.done[cell] for cell in cells]
        return sum(hits) / len(hits)


@dataclass
class PerplexityGuard:
    """Inside the trained window a setting must keep the plain model's perplexity.

    There the model's own positions are exact, and grouping the far part of a prompt can raise its
    perplexity on one text while it lowers it on another (the embedded default at 8k, G2 W4096: 0.14
    above plain on one join of the CPython reference, below on two other texts), so a setting chosen on
    retrieval tasks alone may cost every in-window prompt a little.  The guard measures plain and every
    finalist on the first ``n`` tokens of each text and rules out any setting more than ``tolerance``
    above plain on any of them; plain itself always passes, so an in-window length can always fall back.
    """

    texts: dict[str, list[int]]  # name -> token ids
    tolerance: float = PERPLEXITY_TOLERANCE

    @classmethod
    def from_texts(
        cls, se: SelfExtendModel, texts: dict[str, str] | None, tolerance: float, longest: int
    ) -> PerplexityGuard:
        """Tokenise ``texts`` (default :func:`default_perplexity_text`), each checked to hold ``longest`` tokens."""
        if not tolerance >= 0:
            raise ValueError(f"the perplexity tolerance must be 0 or more, got {tolerance}")
        if texts is None:
            name, text = default_perplexity_text()
            texts = {name: text}
        if not texts:
            raise ValueError("give at least one perplexity text, or turn the guard off")
        ids = {name: se.encode(text) for name, text in texts.items()}
        short = {name: len(i) for name, i in ids.items() if len(i) < longest}
        if short:
            raise ValueError(
                f"the perplexity text(s) {short} (tokens) are shorter than the longest in-window length, {longest}: "
                "give a longer text or drop that length"
            )
        return cls(ids, tolerance)

    def measure(self, se: SelfExtendModel, method: str, length: int) -> dict[str, float]:
        return {name: perplexity(se, ids[:length], Method.parse(method)) for name, ids in self.texts.items()}


def _preference(config: SelfExtendConfig | None) -> tuple:
    """Among equal scores: plain first (exactly the model), then the wider window, then the smaller G."""
    if config is None:
        return (0, 0, 0)
    return (1, -config.neighbor_window, config.group_size)


def search_length(
    runner: _Runner,
    length: int,
    settings: Sequence[SelfExtendConfig | None],
    *,
    tasks: Sequence[str],
    prompts: int,
    screen: int,
    keep: int,
    baselines: Sequence[str],
    guard: PerplexityGuard | None = None,
    validate: int = 0,
    also_validate: Sequence[str] = (),
) -> LengthResult:
    """Two-stage search at one length, then a check on the held-out split.

    All ``settings`` on ``screen`` prompts a depth, then the best ``keep`` on ``prompts`` a depth,
    ranked on :func:`raw_tasks`, and past the window also the best ``keep`` ranked on
    :func:`chat_tasks` (the chat entry's choice); every task is measured and kept in the result.
    Inside the window, with a ``guard``, plain is a finalist too and the finalists' perplexity is
    measured: one above the guard is never chosen (:meth:`LengthResult.keeps_perplexity`).
    With ``validate`` (prompts a depth), once the choice is made the chosen settings, the ``baselines``
    and ``also_validate`` (e.g. what the shipped table ran) run on the held-out twins of the tasks
    (:func:`held_out_twins`); the baselines then run there only, not on the selection split.
    """
    start = time.perf_counter()
    result = LengthResult(length)
    by_name = {method_name(c): c for c in settings}

    def measure(name: str, per_depth: int, on: Sequence[str] = tasks) -> None:
        method = Method.parse(name) if name != "plain" or by_name.get("plain", 0) is None else Method(name)
        result.accuracy.setdefault(name, {}).update({t: runner.run(method, t, length, per_depth) for t in on})
        result.prompts.setdefault(name, {}).update({t: per_depth * len(runner.depths) for t in on})

    raw, chat = raw_tasks(tasks), chat_tasks(tasks, length, runner.se.pretrained_context)
    for name in by_name:
        measure(name, min(screen, prompts))
    finalists = sorted(by_name, key=lambda m: result.rank_key(m, raw))[:keep]
    if chat is not None:
        finalists += [m for m in sorted(by_name, key=lambda m: result.rank_key(m, chat))[:keep] if m not in finalists]
    guarded = guard is not None and length <= runner.se.pretrained_context
    if guarded and "plain" not in finalists:
        finalists.append("plain")  # what an in-window length falls back to when the guard rules the others out
    for name in finalists:
        measure(name, prompts)
    if guarded:
        for name in finalists:
            runner.bar.set_postfix_str(f"{length}: perplexity of {name}")
            result.perplexity[name] = guard.measure(runner.se, name, length)
        result.perplexity_tolerance = guard.tolerance
    result.choose_entries(prompts * len(runner.depths), tasks, runner.se.pretrained_context)
    twins = held_out_twins(tasks) if validate > 0 else []
    for name in baselines:
        if name == "plain" and length + ANSWER_MARGIN > runner.se.pretrained_context:
            continue  # the plain model past its window is known to fail; not worth the time
        measure(name, validate, twins) if twins else measure(name, prompts)
    if twins:
        raw_twins, chat_twins = held_out_twins(raw_tasks(tasks)), held_out_twins(chat or [])
        if result.best_chat and result.best_chat != result.best:  # each entry on the calls it serves
            measure(result.best, validate, raw_twins)
            measure(result.best_chat, validate, chat_twins)
        else:
            measure(result.best, validate, twins)
        for name in also_validate:
            if name in result.accuracy or name in by_name:  # a setting of this length's search
                measure(name, validate, twins)
    result.seconds = time.perf_counter() - start
    return result


def tune(
    se: SelfExtendModel,
    lengths: Sequence[int],
    *,
    tasks: Sequence[str] | None = None,
    depths: int = 5,
    prompts: int = 4,
    screen: int = 1,
    keep: int = 3,
    log: str = "on",
    log_strengths: Sequence[float] = LOG_STRENGTHS,
    baselines: Sequence[str] = (),
    settings: Sequence[SelfExtendConfig | None] | None = None,
    seed: int = 0,
    batch_size: int = 4,
    out_dir: str | Path | None = None,
    perplexity_texts: dict[str, str] | None = None,
    perplexity_tolerance: float | None = PERPLEXITY_TOLERANCE,
    progress: bool = True,
    on_length: Callable[[LengthResult], None] | None = None,
    validate: int = 0,
    also_validate: Sequence[str] | None = None,
) -> tuple[TunedTable, list[LengthResult]]:
    """Search every length and build the model's table; ``out_dir`` keeps one JSON per length as it finishes.

    A length whose JSON is already in ``out_dir`` is read back, not re-run, and every prompt's outcome
    is journalled there as it is scored (:data:`JOURNAL`), so a search that was cut off, even in the
    middle of a length, resumes where it stopped.  ``settings`` replaces the generated candidates (each length
    keeps those that reach it; None stands for plain and is kept inside the window only).
    ``tasks``: default :func:`default_tasks` (the chat pass key too where the model has a chat template).
    Lengths inside the trained window are guarded on perplexity (:class:`PerplexityGuard`) over
    ``perplexity_texts`` (name -> text; default the CPython reference), ``perplexity_tolerance`` above
    plain at most; None turns the guard off.
    ``validate``: prompts a depth on the held-out split for the chosen settings, the ``baselines`` (then
    measured there only) and what the shipped table ran (0: no check; the table then advertises no
    measured quality).  ``also_validate``: settings validated beside the choice where they were searched
    (default: what the shipped table runs at each length, so the choice is compared with what it replaces).
    """
    from tqdm.auto import tqdm

    if validate < 0:
        raise ValueError(f"validate is prompts a depth on the held-out split, 0 or more; got {validate}")
    if not lengths:
        raise ValueError("give at least one length to tune for")
    tasks = default_tasks(se) if tasks is None else list(tasks)
    check_tasks(se, tasks)
    trained = se.pretrained_context
    depth_list = default_depths(depths)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if settings is None:
        plan = {n: candidates(trained, n, log=log, strengths=log_strengths) for n in sorted(set(lengths))}
    else:
        plan = {
            n: [
                c
                for c in dict.fromkeys(settings)
                if (n <= trained if c is None else c.max_context(trained) >= n + ANSWER_MARGIN)
            ]
            for n in sorted(set(lengths))
        }
    shipped = shipped_table(se.model_name)
    compare: dict[int, list[str]] = {n: [] for n in plan}  # validated beside the choice: what it replaces
    for n, found in plan.items():  # what the shipped table runs today is always a candidate: never tune worse
        for chat in (False, True):
            entry = shipped.lookup(n + ANSWER_MARGIN, chat=chat) if shipped is not None else None
            if entry is None:
                continue
            if settings is None and entry.config not in found and (n > trained or entry.config is None or not chat):
                found.append(entry.config)
            if method_name(entry.config) not in compare[n]:  # validated too, where it was searched
                compare[n].append(method_name(entry.config))
    if also_validate is not None:
        compare = {n: list(also_validate) for n in plan}
    for n, found in plan.items():
        if not found:
            raise ValueError(
                f"no setting reaches {n} tokens on a model trained on {trained} (group sizes above "
                f"{MAX_MEASURED_GROUP} are not searched): drop that length"
            )
    inside = [n for n in plan if n <= trained]
    guard = (
        PerplexityGuard.from_texts(se, perplexity_texts, perplexity_tolerance, max(inside))
        if perplexity_tolerance is not None and inside
        else None
    )
    per_prompt = len(tasks) * len(depth_list)
    finalists = {  # at most; guarded lengths add plain
        n: (2 * keep if chat_tasks(tasks, n, trained) else keep) + (guard is not None and n <= trained) for n in plan
    }
    twins = len(held_out_twins(tasks)) * len(depth_list) if validate else 0
    total = sum(
        per_prompt * (len(found) * min(screen, prompts) + min(finalists[n], len(found)) * max(0, prompts - screen))
        + (twins * validate if twins else per_prompt * prompts)
        * sum(b != "plain" or n + ANSWER_MARGIN <= trained for b in baselines)
        + twins * validate * (1 + len(compare[n]))
        for n, found in plan.items()
    )
    bar = tqdm(total=total, desc="tune", disable=not progress)
    runner = _Runner(se, depth_list, seed, batch_size, bar, journal=out / JOURNAL if out is not None else None)
    if runner.resumed and progress:
        bar.write(f"tune: {runner.resumed} prompts already scored, read back from {runner.journal}", file=sys.stderr)
    results: list[LengthResult] = []
    for n, found in plan.items():
        path = out / f"{n}.json" if out is not None else None
        if path is not None and path.is_file():
            result = LengthResult.from_json(json.loads(path.read_text()))
        else:
            result = search_length(
                runner, n, found, tasks=tasks, prompts=prompts, screen=screen, keep=keep, baselines=baselines,
                guard=guard, validate=validate, also_validate=compare[n],
            )  # fmt: skip
            if path is not None:
                path.write_text(json.dumps(result.to_json(), indent=1))
        results.append(result)
        bar.set_postfix_str(f"{n}: {result.best} worst {result.worst(result.best, tasks):.2f}")
        if on_length is not None:
            on_length(result)
    bar.close()
    measured = {
        "tasks": list(tasks),
        "prompts_per_cell": prompts * len(depth_list),
        "device": str(se.device),
        "dtype": _dtype_name(se),
        "ranked_on": "worst task",
    }
    if twins:
        measured |= {"held_out": held_out_twins(tasks), "held_out_prompts_per_cell": validate * len(depth_list)}
    return build_table(se.model_name, trained, results, measured), results


def build_table(model: str, trained: int, results: Sequence[LengthResult], measured: dict | None = None) -> TunedTable:
    """One entry per length: its chosen setting, covering the lengths up to it (checked to reach them).

    Where some length has a chat choice (``best_chat``), the table gets chat entries too, one per
    length (a length without one repeats its main entry, so chat calls of every length are covered).
    """
    entries, chat_entries = [], []

    def entry(result: LengthResult, method: str) -> TableEntry:
        chosen = {t: v for t, v in result.accuracy[method].items() if not is_held_out(t)}
        return TableEntry(result.length, Method.parse(method).config, chosen, result.held_out(method))

    for result in sorted(results, key=lambda r: r.length):
        best = result.best or result.choose(max(sum(p.values()) // len(p) for p in result.prompts.values()))
        entries.append(entry(result, best))
        chat_entries.append(entry(result, result.best_chat or best))
    if not any(r.best_chat for r in results):
        chat_entries = []
    return TunedTable(model, trained, entries, measured=dict(measured or {}), chat_entries=chat_entries)


def _short(task: str) -> str:
    return task.removeprefix(HELD_OUT)


def report(results: Sequence[LengthResult]) -> str:
    """A markdown table: per length, the chosen setting(s) with accuracy per task on the selection split
    and on the held-out one, and every baseline (held out where it was validated)."""
    lines = ["| length | chosen | selection split (per task) | held out | baselines |", "|---|---|---|---|---|"]

    def selection(method: str) -> str:
        return ", ".join(f"{t} {a:.2f}" for t, a in r.accuracy[method].items() if not is_held_out(t))

    def held(method: str) -> str:
        return ", ".join(f"{_short(t)} {a:.2f}" for t, a in r.held_out(method).items()) or "not validated"

    for r in results:
        chosen = selection(r.best)
        if r.best in r.perplexity and "plain" in r.perplexity:
            ppl = ", ".join(f"{r.perplexity[r.best][t]:.2f} (plain {p:.2f})" for t, p in r.perplexity["plain"].items())
            chosen += f"; perplexity {ppl}"
        held_out = held(r.best)
        name = r.best
        if r.best_chat and r.best_chat != r.best:
            name += f" (chat: {r.best_chat})"
            chosen += f"; chat prompts: {selection(r.best_chat)}"
            held_out += f"; chat prompts: {held(r.best_chat)}"
        base = "; ".join(
            f"{m}: " + ", ".join(f"{_short(t)} {a:.2f}" for t, a in r.accuracy[m].items())
            for m in r.accuracy
            if not m.startswith("se:") and m != r.best
        )
        lines.append(f"| {r.length:,} | {name} | {chosen} | {held_out} | {base} |")
    return "\n".join(lines)
