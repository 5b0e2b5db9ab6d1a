"""Long-context evaluation: pass-key grids with plain, dynamic NTK, YaRN and SelfExtend side by side.

Every method runs on the same weights and the same seeded prompts.  Generation bypasses the
context-window check on purpose: the point is to see where each method breaks.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import SelfExtendConfig
from .hf import apply as hf_apply
from .model import SelfExtendModel
from .tasks import families
from .tasks.needle import needle_prompt
from .tasks.passkey import CHAT_INSTRUCTION, chat_passkey_messages, make_passkey_document, passkey_prompt
from .tuning import choose_config

#: ``se:G,W`` with optional log-scaled queries, ``+log`` (strength 1) or ``+log<strength>``.
_SETTING = re.compile(r"se:(\d+),(\d+)(\+log(\d+(?:\.\d*)?|\.\d+)?)?")


@dataclass(frozen=True)
class Method:
    """One way of running the model: ``plain``, ``dynamic-ntk``, ``yarn``, ``selfextend`` or ``se:G,W[+log[S]]``
    (``+log``: log-scaled queries at strength 1, ``+log0.5``: at strength 0.5)."""

    name: str
    config: SelfExtendConfig | None = None  # fixed SelfExtend setting; None with name "selfextend" = shipped defaults

    @classmethod
    def parse(cls, text: str) -> Method:
        text = text.strip()
        if text in ("plain", "dynamic-ntk", "yarn", "selfextend"):
            return cls(text)
        usage = "use plain, dynamic-ntk, yarn, selfextend or se:G,W[+log[STRENGTH]] (e.g. se:8,2048+log0.5)"
        match = _SETTING.fullmatch(text)
        if match is None:
            raise ValueError(f"unknown method {text!r}: {usage}")
        group, window, log, strength = match.groups()
        log_scale = 0.0 if log is None else 1.0 if not strength else float(strength)
        return cls(text, SelfExtendConfig(int(group), int(window), log_scale=log_scale))


def _rotary(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.Module]:
    """The rotary embedding module: it holds ``inv_freq``, or ``<layer type>_inv_freq`` (Gemma 3)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if any(n == "inv_freq" or n.endswith("_inv_freq") for n, _ in child.named_buffers(recurse=False)):
                return parent, name, child
    raise ValueError("no rotary embedding module with inv_freq found")


#: RoPE parameters that do not belong to a scaling type: kept when the type is replaced (Phi's partial rotary).
SHARED_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")


def scaled_rope_parameters(rope_parameters: dict[str, Any], scaled: dict[str, Any]) -> dict[str, Any]:
    """``rope_parameters`` with ``scaled`` (type, factor, ...) in place of the global layers' RoPE.

    Models with one RoPE for all layers get ``scaled`` plus their own theta and partial rotary.  Models with a
    RoPE per layer type (Gemma 3: ``sliding_attention`` and ``full_attention``) get it on the
    ``full_attention`` layers only, each with its own theta: sliding layers see 512-1024 tokens,
    inside their trained range, and SelfExtend leaves them alone too.
    """

    def keep(params: dict[str, Any]) -> dict[str, Any]:  # what the new type shares with the old one
        kept = {k: v for k, v in params.items() if k in SHARED_ROPE_KEYS}
        return {"rope_theta": 10000.0, **kept, **scaled}

    if any(isinstance(v, dict) for v in rope_parameters.values()):
        out = copy.deepcopy(rope_parameters)
        out["full_attention"] = keep(out.get("full_attention") or {})
        return out
    return keep(rope_parameters)


@contextlib.contextmanager
def using(
    se: SelfExtendModel, method: Method, length: int, factor: float = 4.0, *, chat: bool = False
) -> Iterator[None]:
    """Run ``se.model`` as ``method`` inside the block, for prompts of about ``length`` tokens
    (``chat``: asked through the chat template, so ``selfextend`` takes the table's chat entries).

    The RoPE-scaling baselines get ``factor``; YaRN's is raised to ``length / trained`` when that is
    larger: YaRN at a fixed x4 past 4x the window is not what anyone would run, and a baseline set up
    to lose would flatter SelfExtend.  (Dynamic NTK already scales its base with the length.)
    """
    lm, trained = se.model, se.pretrained_context
    if method.name == "yarn":
        factor = max(factor, length / trained)
    previous = hf_apply.settings_of(lm).config if hf_apply.is_applied(lm) else None
    hf_apply.remove(lm)
    swapped = None
    try:
        if method.name in ("dynamic-ntk", "yarn"):
            parent, attr, rotary = _rotary(lm)
            cfg = copy.deepcopy(hf_apply.text_config(lm))
            if method.name == "dynamic-ntk":
                scaled = {"rope_type": "dynamic", "factor": factor}
            else:
                scaled = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": trained}
            cfg.rope_parameters = scaled_rope_parameters(cfg.rope_parameters, scaled)
            new = type(rotary)(config=cfg).to(next(lm.parameters()).device)
            setattr(parent, attr, new)
            swapped = (parent, attr, rotary)
        elif method.name == "selfextend":
            chosen = (
                se.plan.config_for(length, chat)
                if se.plan is not None
                else choose_config(se.model_name, trained, length, chat=chat)
            )
            if chosen is not None:
                hf_apply.apply(lm, chosen)
        elif method.config is not None:
            hf_apply.apply(lm, method.config)
        yield
    finally:
        if swapped is not None:
            setattr(swapped[0], swapped[1], swapped[2])
        hf_apply.remove(lm)
        if previous is not None:
            hf_apply.apply(lm, previous)


def generate_raw(se: SelfExtendModel, prompts: Sequence[str | list[dict[str, str]]], max_new_tokens: int) -> list[str]:
    """Greedy answers for a left-padded batch (raw strings or chat messages), with no window check."""
    encoded = [se.encode(p) for p in prompts]
    ids, mask = se._batch_tensors(encoded)
    with torch.inference_mode():
        out = se.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=se.tokenizer.pad_token_id,
        )
    if hf_apply.is_applied(se.model):
        hf_apply.clear_cache(se.model)
    return [se.tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out]


@dataclass
class GridResult:
    task: str
    lengths: list[int]
    depths: list[float]
    methods: list[str]
    #: accuracy[method][length][depth index]
    accuracy: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)

    def mean(self, method: str, length: int) -> float:
        cells = self.accuracy[method][length]
        return sum(cells) / len(cells)

    def table(self) -> str:
        head = "| length | " + " | ".join(self.methods) + " |\n|---|" + "---|" * len(self.methods) + "\n"
        rows = "".join(
            f"| {n:,} | " + " | ".join(f"{self.mean(m, n):.2f}" for m in self.methods) + " |\n" for n in self.lengths
        )
        return head + rows

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "lengths": self.lengths,
            "depths": self.depths,
            "methods": self.methods,
            "accuracy": {m: {str(n): v for n, v in d.items()} for m, d in self.accuracy.items()},
            "mean": {m: {str(n): self.mean(m, n) for n in self.lengths} for m in self.methods},
            "samples": self.samples,
        }


@dataclass(frozen=True)
class Task:
    """One retrieval task: its seeded prompts, and how many new tokens an answer gets.

    ``make(se, n, depth, seed)`` returns (prompt, expected): a raw string or chat messages of about
    ``n`` tokens, and the text a right answer contains.
    """

    make: Callable[[SelfExtendModel, int, float, int], tuple[str | list[dict[str, str]], str]]
    new_tokens: int
    needs_chat_template: bool = False
    #: One fact asked for (a pass key): what the quality targets and ``quality_context`` are set on;
    #: False for several keyed facts (the needle), which the search weighs after them.
    one_fact: bool = True


def _passkey_task(se: SelfExtendModel, n: int, depth: float, seed: int) -> tuple[str, str]:
    p = passkey_prompt(n, depth, seed, se.count_tokens)
    return p.text, p.passkey


def _needle_task(se: SelfExtendModel, n: int, depth: float, seed: int) -> tuple[str, str]:
    return needle_prompt(n, depth, seed, se.count_tokens)


def _chat_task(se: SelfExtendModel, n: int, depth: float, seed: int) -> tuple[list[dict[str, str]], str]:
    """The pass key asked through the chat template (the raw task does not predict it: see BENCHMARKS.md)."""
    overhead = se.count_tokens(se.with_instruction(chat_passkey_messages(""), CHAT_INSTRUCTION))
    document, key = make_passkey_document(n - overhead, depth, seed, se.count_tokens)
    return se.with_instruction(chat_passkey_messages(document), CHAT_INSTRUCTION), key


def _family_task(family: str, split: str) -> Task:
    """One family of :mod:`selfextend_llm.tasks.families` on one split, as a task.

    Prompts are kept (a bounded LRU): the search asks every candidate the same seeded prompts, and
    building a 128k-token prompt tokenizes it several times (about a second on one core), as long as
    the GPU takes to answer it.
    """
    made: collections.OrderedDict[tuple, tuple[str | list[dict[str, str]], str]] = collections.OrderedDict()

    def make(se: SelfExtendModel, n: int, depth: float, seed: int) -> tuple[str | list[dict[str, str]], str]:
        key = (id(se.tokenizer), se.supports_system_role, n, depth, seed)
        if key not in made:
            made[key] = families.make_prompt(family, split, n, depth, seed, se.count_tokens, se.with_instruction)
            if len(made) > 64:
                made.popitem(last=False)
        made.move_to_end(key)
        prompt, expected = made[key]
        return copy.deepcopy(prompt), expected

    _, keys, form = families.parse_family(family)
    return Task(make, 20 if form == "chat" else 12, needs_chat_template=form == "chat", one_fact=keys == "key")


#: Prefix of the held-out split's task names (``heldout/prose-key-chat``): measured after a search, never ranked on.
HELD_OUT = "heldout/"
#: The selection split's families (what ``tune`` ranks on by default) and their held-out twins.
FAMILIES = families.family_names()
HELD_OUT_FAMILIES = [HELD_OUT + f for f in FAMILIES]

#: ``passkey``: raw completion; ``needle``: multi-key needle, raw; ``chat``: the pass key asked through the
#: model's chat template, as LangChain's and LlamaIndex's chat models and the server ask (a chat answer is
#: wordier, hence more new tokens).  Then every family of :mod:`~selfextend_llm.tasks.families` on both
#: splits (``filler-key`` ... ``prose-keys-chat``, and ``heldout/...``).
TASKS = {
    "passkey": Task(_passkey_task, 12),
    "needle": Task(_needle_task, 12, one_fact=False),
    "chat": Task(_chat_task, 16, needs_chat_template=True),
    **{f: _family_task(f, "select") for f in FAMILIES},
    **{HELD_OUT + f: _family_task(f, "heldout") for f in FAMILIES},
}


def is_held_out(task: str) -> bool:
    """Whether ``task`` belongs to the held-out split (never ranked on by the search)."""
    return task.startswith(HELD_OUT)


def check_tasks(se: SelfExtendModel, tasks: Sequence[str]) -> None:
    """Refuse unknown tasks, and the chat task on a model without a chat template, before any run."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: use {sorted(TASKS)}")
    if any(TASKS[t].needs_chat_template for t in tasks) and not getattr(se.tokenizer, "chat_template", None):
        raise ValueError(f"{se.model_name} has no chat template, so the chat task cannot run: drop it from the tasks")


def task_grid(
    se: SelfExtendModel,
    task: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    methods: Sequence[Method],
    prompts_per_cell: int = 4,
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = True,
) -> GridResult:
    """Exact-match accuracy of ``task`` for each method x length x depth over seeded prompts."""
    from tqdm.auto import tqdm

    check_tasks(se, [task])
    spec = TASKS[task]
    result = GridResult(task, list(lengths), list(depths), [m.name for m in methods])
    total = len(methods) * len(lengths) * len(depths) * prompts_per_cell
    bar = tqdm(total=total, desc=task, disable=not progress)
    for method in methods:
        result.accuracy[method.name] = {}
        for n in lengths:
            cells = []
            with using(se, method, n + 16, chat=spec.needs_chat_template):
                for di, depth in enumerate(depths):
                    items = [spec.make(se, n, depth, seed + 1000 * di + i) for i in range(prompts_per_cell)]
                    hits = 0
                    for b0 in range(0, len(items), batch_size):
                        batch = items[b0 : b0 + batch_size]
                        answers = generate_raw(se, [text for text, _ in batch], spec.new_tokens)
                        for (_, expected), answer in zip(batch, answers, strict=True):
                            ok = expected in answer
                            hits += ok
                            result.samples.append(
                                {
                                    "method": method.name,
                                    "length": n,
                                    "depth": depth,
                                    "expected": expected,
                                    "answer": answer,
                                    "correct": ok,
                                }
                            )
                        bar.update(len(batch))
                    cells.append(hits / len(items))
            result.accuracy[method.name][n] = cells
            bar.set_postfix_str(f"{method.name} {n}: {sum(cells) / len(cells):.2f}")
    bar.close()
    return result


def passkey_grid(se: SelfExtendModel, lengths, depths, methods, prompts_per_cell: int = 4, **kwargs) -> GridResult:
    """Pass-key accuracy for each method x length x depth (see :func:`task_grid`)."""
    return task_grid(se, "passkey", lengths, depths, methods, prompts_per_cell, **kwargs)


def perplexity(se: SelfExtendModel, ids: Sequence[int], method: Method) -> float:
    """Perplexity of the token ids ``ids`` under ``method`` (one teacher-forced pass over all of them)."""
    x = torch.tensor([list(ids)], device=se.device)
    with using(se, method, len(ids)), torch.inference_mode():
        loss = se.model(x, labels=x).loss
    return float(torch.exp(loss.float()))


def default_perplexity_text() -> tuple[str, str]:
    """(name, text) of the text the tuning's in-window perplexity guard reads by default: the CPython
    language reference shipped with every Python (``pydoc_data.topics``, topics sorted and joined;
    prose with code, ~100k tokens), so no download is needed."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions strip pydoc_data
        raise ValueError(
            "this Python has no pydoc_data (the default perplexity text): pass a text file with "
            "--perplexity-text FILE, or --no-perplexity-guard"
        ) from err
    return "pydoc_data.topics", "\n\n".join(topics[k] for k in sorted(topics))


def perplexity_curve(
    se: SelfExtendModel, text: str, lengths: Sequence[int], methods: Sequence[Method], progress: bool = True
) -> dict[str, dict[int, float]]:
    """Perplexity of the first ``n`` tokens of ``text`` for each method and length."""
    from tqdm.auto import tqdm

    ids = se.encode(text)
    usable = [n for n in lengths if n <= len(ids)]
    if not usable:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the shortest length asked for ({min(lengths)})")
    curve: dict[str, dict[int, float]] = {}
    bar = tqdm(total=len(usable) * len(methods), desc="perplexity", disable=not progress)
    for method in methods:
        curve[method.name] = {}
        for n in usable:
            curve[method.name][n] = perplexity(se, ids[:n], method)
            bar.update(1)
    bar.close()
    return curve


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    try:
        import matplotlib
    except ModuleNotFoundError as err:  # the optional [plots] extra
        from .validation import missing_extra

        raise missing_extra("matplotlib", "plots") from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_perplexity(curve: dict[str, dict[int, float]], path: str | Path) -> Path:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in curve.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.legend()
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_heatmaps(result: GridResult, path: str | Path) -> Path:
    """Needle-in-a-haystack picture: one panel per method, length across, depth down, green = found."""
    plt = _pyplot()

    k = len(result.methods)
    cols = min(k, 4)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax, method in zip(axes.flat, result.methods, strict=False):
        grid = [[result.accuracy[method][n][d] for n in result.lengths] for d in range(len(result.depths))]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(method, fontsize=10)
        ax.set_xticks(range(len(result.lengths)), [f"{n // 1024}k" for n in result.lengths], fontsize=8)
        ax.set_yticks(range(len(result.depths)), [f"{int(d * 100)}%" for d in result.depths], fontsize=8)
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    fig.suptitle(f"{result.task} accuracy")
    fig.tight_layout()
    return _save_figure(fig, path)


def save(result: GridResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2))
    return path


def default_depths(count: int = 5) -> list[float]:
    """Needle depths spread from 5% to 95%."""
    if count == 1:
        return [0.5]
    return [round(0.05 + 0.9 * i / (count - 1), 3) for i in range(count)]


__all__ = [
    "FAMILIES",
    "HELD_OUT_FAMILIES",
    "TASKS",
    "GridResult",
    "Method",
    "Task",
    "check_tasks",
    "default_depths",
    "is_held_out",
    "passkey_grid",
    "perplexity_curve",
    "plot_heatmaps",
    "plot_perplexity",
    "save",
    "task_grid",
]
