"""The G/W policy, in one place: which grouping a model runs with, and how far it may be asked to read.

SelfExtend's quality depends on G and W; the best pair changes with the prompt length.  With no
fixed setting, each call takes the setting for its own length from the model's *table*: a tuned
file (``selfextend-llm tune`` writes one per model, or the caller passes a path), else the table
shipped for that model, else plain attention inside the trained window and the rule of thumb
beyond it.  :func:`plan` turns what a caller asked for (``load``'s or ``apply``'s arguments) into a
:class:`Plan`; :meth:`Plan.config_for` gives the grouping of each call and :meth:`Plan.source_for`
says where it came from.

A table may hold a second list, for calls that go through the chat template (chat messages rather
than a raw string): on the embedded default the settings that answer a document question asked
that way are not those that complete raw text best (at 32k: G16 W256 finds 1.00 of the chat pass
keys and G7 W2048 + log-scaled queries none, while the latter finds more raw needles).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import validation
from .config import SelfExtendConfig, check_reach

#: Tables shipped with the package, one JSON file per model name (same format ``tune`` writes).
SHIPPED_DIR = Path(__file__).with_name("tables")
#: Format version of table files; a file of another version is refused with what to do.
TABLE_VERSION = 1
#: Held-out retrieval a length must reach, raw and chat, to count as read well (:meth:`TunedTable.quality_context`).
QUALITY_BAR = 0.9

SOURCE_FIXED = "fixed by the caller"
SOURCE_SHIPPED = "shipped table"
SOURCE_RULE = "rule of thumb"
SOURCE_PLAIN = "plain (inside the trained window)"


class TableError(ValueError):
    """A tuned-table file that cannot be used (unreadable, another model, an entry that cannot reach)."""


def _log_json(cfg: SelfExtendConfig) -> bool | float:
    """A table's ``log_scale``: true/false for strengths 1 and 0 (as tables written before strengths were
    tunable say it), the number otherwise."""
    return bool(cfg.log_scale) if cfg.log_scale in (0, 1) else cfg.log_scale


def _log_read(value: Any) -> float:
    """``log_scale`` as a table holds it: a boolean or a strength; anything else is a malformed table."""
    if not isinstance(value, (bool, int, float)):
        raise TypeError(f"log_scale must be true, false or a strength, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TableEntry:
    """The setting for calls of up to ``upto`` tokens (from the previous entry's ``upto``); None is plain."""

    upto: int
    config: SelfExtendConfig | None
    #: What the search measured at ``upto`` (task -> accuracy); informative, not used to choose.
    accuracy: dict[str, float] = field(default_factory=dict, compare=False)
    #: What the setting scored at ``upto`` on the held-out split (``heldout/<family>`` -> accuracy), which the
    #: search never ranked on: the quality the table advertises (:meth:`TunedTable.quality`).
    held_out: dict[str, float] = field(default_factory=dict, compare=False)

    def retrieval(self, chat: bool) -> float | None:
        """The worst held-out one-fact retrieval family of one form (raw or chat); None where not validated."""
        from .tasks.families import parse_family

        scores = []
        for task, value in self.held_out.items():
            _, keys, form = parse_family(task.split("/")[-1])
            if keys == "key" and (form == "chat") == chat:
                scores.append(value)
        return min(scores) if scores else None

    def to_json(self) -> dict[str, Any]:
        cfg = self.config
        setting = (
            {"plain": True}
            if cfg is None
            else {"group_size": cfg.group_size, "neighbor_window": cfg.neighbor_window, "log_scale": _log_json(cfg)}
        )
        return {
            "upto": self.upto, **setting, **({"accuracy": self.accuracy} if self.accuracy else {}),
            **({"held_out": self.held_out} if self.held_out else {}),
        }  # fmt: skip


@dataclass
class TunedTable:
    """A model's measured settings by length; entries sorted by ``upto``, each reaching its whole range."""

    model: str
    pretrained_context: int
    entries: list[TableEntry]
    measured: dict[str, Any] = field(default_factory=dict)
    #: Where it was read from (``"shipped table"`` or ``"tuned file <path>"``); set by :func:`find_table`.
    source: str = "tuned"
    #: Settings for calls through the chat template, where they were measured apart (past the trained
    #: window); a chat call of a length they do not cover takes :attr:`entries` like any other.
    chat_entries: list[TableEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.entries = sorted(self.entries, key=lambda e: e.upto)
        self.chat_entries = sorted(self.chat_entries, key=lambda e: e.upto)
        self.check()

    def check(self) -> None:
        """Refuse entries that cannot reach their range: a hole would silently fall back to the rule of thumb."""
        for entry in [*self.entries, *self.chat_entries]:
            if entry.upto < 1:
                raise TableError(f"{self.model}: table entry upto={entry.upto} must be a positive token count")
            if entry.config is None:
                if entry.upto > self.pretrained_context:
                    raise TableError(
                        f"{self.model}: a plain entry up to {entry.upto} tokens is past the trained window "
                        f"({self.pretrained_context}); plain attention cannot read that far"
                    )
                continue
            try:
                reach = entry.config.max_context(self.pretrained_context)
            except ValueError as err:
                raise TableError(f"{self.model}: table entry up to {entry.upto} tokens: {err}") from err
            if reach < entry.upto:
                raise TableError(
                    f"{self.model}: G={entry.config.group_size}, W={entry.config.neighbor_window} reaches {reach} "
                    f"tokens, short of its entry's {entry.upto}; raise G or lower upto (re-run selfextend-llm tune)"
                )

    @property
    def longest(self) -> int:
        return max((e.upto for e in [*self.entries, *self.chat_entries]), default=0)

    def lookup(self, total_tokens: int, neighbor_window: int | None = None, *, chat: bool = False) -> TableEntry | None:
        """The entry for a call of ``total_tokens`` (``chat``: through the chat template, which looks in
        :attr:`chat_entries` first); None when the table does not cover it."""
        lists = [self.chat_entries, self.entries] if chat else [self.entries]
        for entries in lists:
            for entry in entries:
                if total_tokens > entry.upto:
                    continue
                if entry.config is None or neighbor_window in (None, entry.config.neighbor_window):
                    return entry
        return None

    def quality(self) -> dict[int, dict[str, float | None]]:
        """Held-out one-fact retrieval per validated length: ``{upto: {"raw": worst raw family, "chat": worst
        chat family}}`` (a form not validated there is None; lengths with nothing validated are left out)."""
        out: dict[int, dict[str, float | None]] = {}
        chat_by_upto = {e.upto: e for e in self.chat_entries}
        for entry in self.entries:
            chat_entry = chat_by_upto.get(entry.upto, entry)
            raw, chat = entry.retrieval(False), chat_entry.retrieval(True)
            if chat is None and chat_entry is not entry:
                chat = entry.retrieval(True)
            if raw is not None or chat is not None:
                out[entry.upto] = {"raw": raw, "chat": chat}
        return out

    def quality_context(self, bar: float = QUALITY_BAR) -> int | None:
        """The longest prompt length up to which held-out retrieval was measured at ``bar`` or better, raw and
        through the chat template, at every entry past the trained window up to it (inside the window the
        model reads its own positions).  None when no entry past the window was validated: then only the
        hard window is known, not how well the model reads that far.  An entry past the window that was
        not validated, or validated in one form only, ends the claim where it starts."""
        quality = self.quality()
        past = sorted(e.upto for e in self.entries if e.upto > self.pretrained_context)
        if not any(upto in quality for upto in past):
            return None
        measured = {form for q in quality.values() for form, v in q.items() if v is not None}  # chat: if templated
        reach = self.pretrained_context
        for upto in past:
            scores = [quality.get(upto, {}).get(form) for form in measured]
            if any(v is None or v < bar for v in scores):
                break
            reach = upto
        return reach

    def is_chat_entry(self, entry: TableEntry) -> bool:
        return any(entry is e for e in self.chat_entries)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": TABLE_VERSION,
            "model": self.model,
            "pretrained_context": self.pretrained_context,
            "entries": [e.to_json() for e in self.entries],
            **({"chat_entries": [e.to_json() for e in self.chat_entries]} if self.chat_entries else {}),
            "measured": self.measured,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "tuned") -> TunedTable:
        if not isinstance(data, dict) or data.get("version") != TABLE_VERSION:
            raise TableError(
                f"{source}: not a version-{TABLE_VERSION} SelfExtend table; re-create it with selfextend-llm tune"
            )

        def read(e: dict[str, Any]) -> TableEntry:
            config = (
                None
                if e.get("plain")
                else SelfExtendConfig(int(e["group_size"]), int(e["neighbor_window"]), _log_read(e["log_scale"]))
            )
            return TableEntry(int(e["upto"]), config, dict(e.get("accuracy", {})), dict(e.get("held_out", {})))

        try:
            entries = [read(e) for e in data["entries"]]
            chat = [read(e) for e in data.get("chat_entries", [])]
            return cls(
                str(data["model"]), int(data["pretrained_context"]), entries, dict(data.get("measured", {})), source,
                chat,
            )  # fmt: skip
        except TableError:
            raise
        except (KeyError, TypeError, ValueError) as err:  # ValueError: a setting SelfExtendConfig refuses
            raise TableError(f"{source}: malformed table ({err!r}); re-create it with selfextend-llm tune") from err

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def _file_key(model_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_") or "model"


def tuned_dir() -> Path:
    """Where ``selfextend-llm tune`` saves tables by default: ``<cache>/tuned`` (``$SELFEXTEND_LLM_CACHE``).

    The same root as :func:`selfextend_llm.loading.cache_root`, read here so that this module stays
    free of torch (the CLI and the vLLM plugin plan before any model loads).
    """
    root = os.environ.get("SELFEXTEND_LLM_CACHE", Path.home() / ".cache" / "selfextend-llm")
    return Path(root) / "tuned"


def tuned_path(model_name: str) -> Path:
    """The per-model file that :func:`find_table` looks for: ``<cache>/tuned/<model name>.json``."""
    return tuned_dir() / f"{_file_key(model_name)}.json"


def read_table(path: str | Path, model_name: str | None, pretrained_context: int) -> TunedTable:
    """A table file, refused when it was tuned for another model or another trained window."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TableError(
            f"tuned table {str(path)!r} does not exist; pass the JSON that selfextend-llm tune --save wrote"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TableError(f"tuned table {str(path)!r} is not readable JSON ({err}); re-create it with tune") from err
    table = TunedTable.from_json(data, f"tuned file {path}")
    if table.pretrained_context != pretrained_context:
        raise TableError(
            f"tuned table {str(path)!r} was made for a model trained on {table.pretrained_context} tokens, but "
            f"this one is trained on {pretrained_context}; tune this model (selfextend-llm tune --model ...)"
        )
    if model_name is not None and _file_key(table.model) != _file_key(model_name):
        raise TableError(
            f"tuned table {str(path)!r} was made for {table.model!r}, not {model_name!r}; tune this model "
            "(selfextend-llm tune --model ...) or pass its own table"
        )
    return table


def shipped_table(model_name: str | None) -> TunedTable | None:
    """The table shipped in the package for ``model_name``, if any."""
    if model_name is None:
        return None
    path = SHIPPED_DIR / f"{_file_key(model_name)}.json"
    if not path.is_file():
        return None
    return TunedTable.from_json(json.loads(path.read_text()), SOURCE_SHIPPED)


def find_table(model_name: str | None, pretrained_context: int, path: str | Path | None = None) -> TunedTable | None:
    """The table a model runs with: ``path`` if given, else its tuned file in the cache, else the shipped one."""
    if path is not None:
        return read_table(path, None, pretrained_context)
    if model_name is not None:
        own = tuned_path(model_name)
        if own.is_file():
            return read_table(own, model_name, pretrained_context)
    table = shipped_table(model_name)
    if table is not None and table.pretrained_context != pretrained_context:
        return None  # a model of the same name with another window: the shipped numbers do not apply
    return table


def choose_config(
    model_name: str | None,
    pretrained_context: int,
    total_tokens: int,
    *,
    neighbor_window: int | None = None,
    table: TunedTable | None | bool = True,
    chat: bool = False,
) -> SelfExtendConfig | None:
    """The grouping for a call of ``total_tokens`` (prompt plus new tokens); None means plain attention.

    ``table``: a :class:`TunedTable`, True to look one up for ``model_name`` (:func:`find_table`),
    or None/False for none.  A covered length takes the table's entry (on the embedded default,
    grouping beats the plain model inside its own window too).  Otherwise: plain inside the trained
    window and the rule of thumb beyond it.  ``chat``: the call goes through the chat template
    (the table's chat entries, where it has them).
    """
    return _choose(model_name, pretrained_context, total_tokens, neighbor_window, table, chat)[0]


def _choose(
    model_name: str | None,
    pretrained_context: int,
    total_tokens: int,
    neighbor_window: int | None,
    table: TunedTable | None | bool,
    chat: bool = False,
) -> tuple[SelfExtendConfig | None, str]:
    if table is True:
        table = find_table(model_name, pretrained_context)
    if isinstance(table, TunedTable):
        entry = table.lookup(total_tokens, neighbor_window, chat=chat)
        if entry is not None:
            return entry.config, table.source + (", chat entry" if table.is_chat_entry(entry) else "")
    if total_tokens <= pretrained_context:
        return None, SOURCE_PLAIN
    return SelfExtendConfig.for_target(pretrained_context, total_tokens, neighbor_window=neighbor_window), SOURCE_RULE


@dataclass(frozen=True)
class Plan:
    """What a model runs with, decided once when SelfExtend is turned on.

    ``config`` is the grouping set up front; ``context_window`` the longest prompt plus answer
    that callers are promised; ``adaptive`` whether each call re-chooses its grouping for its own
    length (:meth:`config_for`), keeping an explicit ``neighbor_window`` as given; ``table`` the
    measured settings it chooses from (None: rule of thumb only).
    """

    config: SelfExtendConfig
    context_window: int
    adaptive: bool
    model_name: str | None
    pretrained_context: int
    neighbor_window: int | None = None
    table: TunedTable | None = None

    def config_for(self, total_tokens: int, chat: bool = False) -> SelfExtendConfig | None:
        """The grouping for a call of ``total_tokens`` (prompt plus new tokens); None: exactly plain.
        ``chat``: the prompt went through the chat template (the table's chat entries apply)."""
        if not self.adaptive:
            return self.config
        args = (self.model_name, self.pretrained_context, total_tokens, self.neighbor_window, self.table, chat)
        return _choose(*args)[0]

    def source_for(self, total_tokens: int, chat: bool = False) -> str:
        """Where the grouping of such a call comes from: a tuned file, the shipped table, the rule of thumb..."""
        if not self.adaptive:
            return SOURCE_FIXED
        args = (self.model_name, self.pretrained_context, total_tokens, self.neighbor_window, self.table, chat)
        return _choose(*args)[1]

    @property
    def source(self) -> str:
        """Where the settings come from overall (``info`` prints it)."""
        if not self.adaptive:
            return SOURCE_FIXED
        if self.table is None:
            return SOURCE_RULE
        beyond = (
            f", {SOURCE_RULE} past {self.table.longest:,} tokens" if self.context_window > self.table.longest else ""
        )
        return self.table.source + beyond


def plan(
    model_name: str | None,
    pretrained_context: int,
    *,
    target_context: int | None = None,
    group_size: int | None = None,
    neighbor_window: int | None = None,
    config: SelfExtendConfig | None = None,
    adaptive: bool = True,
    tuned_table: str | Path | TunedTable | bool | None = None,
    log_scale: float | None = None,
) -> Plan:
    """Turn a caller's request into a :class:`Plan`, refusing what cannot be reached.

    * ``config`` or ``group_size`` fixes the grouping (``W`` from the rule of thumb when only ``G``
      is given); the window is ``target_context``, else the setting's reach ``(L - W) * G + W``.
    * Otherwise the target (default: four times the trained window) is checked against the
      largest group size accepted; ``adaptive=True`` (``load``) then lets each call take the
      table's setting for its length, ``adaptive=False`` (``apply``) fixes the rule of thumb.
    * ``tuned_table``: a table file (or table) to use instead of the one found for ``model_name``;
      False for none (rule of thumb only).
    * ``log_scale``: the strength of log-scaled queries of a grouping fixed by ``group_size`` (refused
      without one: the table's entries carry their own).
    """
    trained = pretrained_context
    if config is not None and log_scale is not None:
        raise ValueError(
            "pass log_scale inside the SelfExtendConfig (SelfExtendConfig(G, W, log_scale=...)), not beside it"
        )
    log_scale = validation.log_strength(log_scale, group_size)
    if config is None and group_size is not None:
        window = neighbor_window or SelfExtendConfig.for_target(trained, target_context or 4 * trained).neighbor_window
        config = SelfExtendConfig(group_size, window, log_scale=log_scale or 0.0)
    if config is not None:
        reach = config.max_context(trained)
        if target_context is not None and target_context > reach:
            raise ValueError(
                f"target_context={target_context} is beyond what G={config.group_size}, W={config.neighbor_window} "
                f"can reach on a model trained on {trained} tokens ({reach}); raise group_size, or leave the "
                "grouping out to let SelfExtend choose"
            )
        return Plan(config, target_context or reach, False, model_name, trained, config.neighbor_window)
    if not adaptive:
        target = target_context or 4 * trained
        check_reach(trained, target, neighbor_window)
        config = SelfExtendConfig.for_target(trained, target, neighbor_window=neighbor_window)
        return Plan(config, target, False, model_name, trained, neighbor_window)
    target = target_context or 4 * trained
    check_reach(trained, target, neighbor_window)
    if tuned_table is not None and not isinstance(tuned_table, (bool, str, os.PathLike, TunedTable)):
        raise TypeError(
            f"tuned_table must be a path to a table from selfextend-llm tune, True (look it up), False (none) or "
            f"None, got {type(tuned_table).__name__}"
        )
    if tuned_table is True:
        tuned_table = None
    if tuned_table is False:
        table = None
    elif isinstance(tuned_table, TunedTable):
        table = tuned_table
    else:
        table = find_table(model_name, trained, tuned_table)
    chosen, _ = _choose(model_name, trained, target, neighbor_window, table)
    config = chosen or SelfExtendConfig(1, neighbor_window or min(trained // 2, 1024))
    return Plan(config, max(target, trained), True, model_name, trained, neighbor_window, table)
