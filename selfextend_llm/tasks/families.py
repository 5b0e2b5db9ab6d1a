"""Retrieval task families with a split the tuner never ranks on.

A table tuned on one wording of one task overfits it: on the embedded default the search's own pass key
said 0.80 at 128k where pass keys worded otherwise, in other filler or in real prose, were found 0.00 of
the time, and narrow windows chosen on its chat pass key failed chat questions worded otherwise at 64k.
So retrieval is measured over *families*, every combination of

* haystack: ``filler`` (repeated short sentences) or ``prose`` (real English: the CPython language
  reference and the standard library's docstrings, both shipped with every Python: nothing to download);
* keys: ``key`` (one fact, asked for) or ``keys`` (four keyed facts of one kind, one asked for: the model
  must take the right one, not any number);
* form: raw completion, or ``-chat``: one user turn through the model's chat template with an
  instruction, the way LangChain, LlamaIndex and the server ask;

and each family has two *splits* made of disjoint material: ``select`` (what ``tune`` ranks on) and
``heldout`` (measured only after the choice is made, never used to make it): other fact and question
wordings, other filler sentences, other prose passages, other instructions and other key names.
A prompt is ``(split, family, length, depth, seed)``: seeded, so every run sees the same prompts.
"""

from __future__ import annotations

import ast
import functools
import random
import sysconfig
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("select", "heldout")
HAYSTACKS = ("filler", "prose")
KEYS = ("key", "keys")
FORMS = ("raw", "chat")


@dataclass(frozen=True)
class Wording:
    """How one fact is stated and asked: ``fact`` and ``question`` take ``{v}`` (value) and ``{k}`` (key
    name, multi-key wordings only); ``answer`` starts the raw completion's answer."""

    fact: str
    question: str
    answer: str


#: One-fact wordings.  The first select wording is the original pass key, so old results stay comparable.
SINGLE: dict[str, tuple[Wording, ...]] = {
    "select": (
        Wording("The pass key is {v}. Remember it. {v} is the pass key.", "What is the pass key?", "The pass key is"),
        Wording(
            "IMPORTANT: the access code for the archive room is {v}.",
            "What is the access code for the archive room?",
            "The access code for the archive room is",
        ),
        Wording(
            "Note that the invoice number of the March order is {v}.",
            "What is the invoice number of the March order?",
            "The invoice number of the March order is",
        ),
    ),
    "heldout": (
        Wording(
            "The secret number of the blue vault is {v}; keep it safe.",
            "What is the secret number of the blue vault?",
            "The secret number of the blue vault is",
        ),
        Wording(
            "Remember this: the locker combination written on the card was {v}.",
            "What was the locker combination written on the card?",
            "The locker combination written on the card was",
        ),
        Wording(
            "For the record, the patient's file number is {v}.",
            "What is the patient's file number?",
            "The patient's file number is",
        ),
    ),
}

#: Multi-key wordings: every needle of a prompt has the same wording with its own key name.
MULTI: dict[str, tuple[Wording, ...]] = {
    "select": (
        Wording(
            "One of the special magic numbers for {k} is: {v}.",
            "What is the special magic number for {k}?",
            "The special magic number for {k} is",
        ),
        Wording(
            "The serial number of the {k} device is {v}.",
            "What is the serial number of the {k} device?",
            "The serial number of the {k} device is",
        ),
    ),
    "heldout": (
        Wording(
            "The registration code of the {k} project is {v}.",
            "What is the registration code of the {k} project?",
            "The registration code of the {k} project is",
        ),
        Wording(
            "Agent {k} was given the badge number {v}.",
            "What badge number was agent {k} given?",
            "Agent {k} was given the badge number",
        ),
    ),
}

#: Key names of multi-key prompts, disjoint between the splits.
KEY_NAMES: dict[str, tuple[str, ...]] = {
    "select": ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper"),
    "heldout": ("kestrel", "lotus", "maple", "nectar", "orchid", "pebble", "quartz", "raven", "saffron", "tundra"),
}

#: Filler haystacks: a few sentences repeated, other sentences for each split.
FILLERS: dict[str, tuple[str, ...]] = {
    "select": (
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",
        "The meeting reviewed the budget. The plan was approved. The committee moved to the next item. ",
    ),
    "heldout": (
        "The river runs past the old mill. A dog sleeps in the shade. The baker opens at dawn. ",
        "Trains leave every hour from the north platform. Passengers wait by the clock. The weather is mild. ",
    ),
}

#: What a raw prompt starts with, and the chat instruction (through :meth:`SelfExtendModel.with_instruction`).
INTROS: dict[str, tuple[str, ...]] = {
    "select": (
        "There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about it.\n\n",
    ),
    "heldout": ("Read the following text carefully. You will be asked about one detail of it at the end.\n\n",),
}
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "select": ("Answer the question using the document.",),
    "heldout": ("You are given a long document. Answer the question at its end from what the document says.",),
}

#: Needles in a multi-key prompt (the one asked for and distractors of the same wording).
N_KEYS = 4


def family_names() -> list[str]:
    """Every family, e.g. ``filler-key``, ``prose-keys-chat`` (chat forms end in ``-chat``)."""
    return [f"{h}-{k}{'-chat' if f == 'chat' else ''}" for f in FORMS for h in HAYSTACKS for k in KEYS]


def parse_family(name: str) -> tuple[str, str, str]:
    """(haystack, keys, form) of a family name; a clear error for anything else."""
    parts = name.split("-")
    form = "chat" if parts[-1] == "chat" else "raw"
    parts = parts[:-1] if form == "chat" else parts
    if len(parts) != 2 or parts[0] not in HAYSTACKS or parts[1] not in KEYS:
        raise ValueError(f"unknown task family {name!r}: use one of {', '.join(family_names())}")
    return parts[0], parts[1], form


def _split_of(name: str) -> int:
    """A passage's split by a stable hash of its name (0: select, 1: held out)."""
    return zlib.crc32(name.encode()) % 2


def prose_passages(split: str) -> tuple[str, ...]:
    """English passages of one split: the language reference's topics and the standard library's
    docstrings (module, class and function, read with ``ast``: nothing is imported), split by name.
    A passage found under both splits' names (the same docstring in two modules) is kept in the
    selection split only, so the held-out split never holds a passage the search saw."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _all_passages()[SPLITS.index(split)]


@functools.cache
def _all_passages() -> tuple[tuple[str, ...], tuple[str, ...]]:
    splits: tuple[dict[str, None], dict[str, None]] = ({}, {})  # ordered sets
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; the docstrings alone suffice
        topics = {}
    for k in sorted(topics):
        splits[_split_of(k)][topics[k].strip()] = None
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:  # prose, not one-line labels
                    splits[_split_of(path.name)][doc.strip()] = None
    select, held = splits
    held = {p: None for p in held if p not in select}
    if not select or not held:
        raise ValueError("this Python has neither pydoc_data nor its standard library sources: no prose haystack")
    return tuple(select), tuple(held)


def _haystack(kind: str, split: str, chars: int, rng: random.Random) -> list[str]:
    """Paragraphs of about ``chars`` characters: one filler repeated, or shuffled prose passages."""
    if kind == "filler":
        filler = rng.choice(FILLERS[split])
        per_paragraph = 8
        block = filler * per_paragraph
        return [block] * max(1, round(chars / len(block)))
    passages = list(prose_passages(split))
    rng.shuffle(passages)
    out, total, i = [], 0, 0
    while total < chars:  # past the end of a split (a long prompt): the passages again, in another order
        if i == len(passages):
            rng.shuffle(passages)
            i = 0
        out.append(passages[i])
        total += len(passages[i]) + 2
        i += 1
    return out


def _trim(paragraphs: list[str], chars: int) -> list[str]:
    """The first ``chars`` characters of the paragraphs (the last one cut at a sentence or word end)."""
    out, total = [], 0
    for p in paragraphs:
        if total + len(p) <= chars:
            out.append(p)
            total += len(p) + 2
            continue
        rest = p[: max(0, chars - total)]
        cut = max(rest.rfind(". "), rest.rfind(" "))
        if cut > 0:
            out.append(rest[: cut + 1])
        break
    return out or [paragraphs[0][: max(1, chars)]]


@dataclass(frozen=True)
class Needles:
    """What a prompt hides and asks: the facts (the asked one first), the question, the raw answer's start."""

    facts: list[str]
    question: str
    answer_start: str
    expected: str


def _needles(keys: str, split: str, rng: random.Random) -> Needles:
    if keys == "key":
        w = rng.choice(SINGLE[split])
        value = str(rng.randint(10_000, 99_999) if split == "select" else rng.randint(100_000, 999_999))
        return Needles([w.fact.format(v=value)], w.question, w.answer, value)
    w = rng.choice(MULTI[split])
    names = rng.sample(KEY_NAMES[split], N_KEYS)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in names]
    facts = [w.fact.format(k=k, v=v) for k, v in zip(names, values, strict=True)]
    return Needles(facts, w.question.format(k=names[0]), w.answer.format(k=names[0]), values[0])


def _place(paragraphs: list[str], needles: Needles, depth: float, rng: random.Random) -> str:
    """Paragraphs joined with the asked fact at ``depth`` (0..1) and any distractors at random places."""
    slots = [round(len(paragraphs) * depth)] + [rng.randint(0, len(paragraphs)) for _ in needles.facts[1:]]
    out: list[str] = []
    for i in range(len(paragraphs) + 1):
        out += [fact for fact, slot in zip(needles.facts, slots, strict=True) if slot == i]
        if i < len(paragraphs):
            out.append(paragraphs[i])
    return "\n\n".join(out)


Prompt = str | list[dict[str, Any]]


def make_prompt(
    family: str,
    split: str,
    n_tokens: int,
    depth: float,
    seed: int,
    measure: Callable[[Prompt], int],
    with_instruction: Callable[[list[dict[str, Any]], str], list[dict[str, Any]]] | None = None,
) -> tuple[Prompt, str]:
    """(prompt, expected answer) of about ``n_tokens`` tokens, never more.

    ``measure`` counts a prompt's tokens (the model's tokenizer, its chat template for messages);
    ``with_instruction`` adds the instruction to chat messages the way the model's template takes it
    (needed for chat families).  The haystack is sized from the text's own characters per token and
    trimmed until the whole prompt fits.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    haystack, keys, form = parse_family(family)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within 0..1, got {depth}")
    if form == "chat" and with_instruction is None:
        raise ValueError("a chat family needs with_instruction (the model's way of adding the instruction)")
    rng = random.Random(zlib.crc32(f"{split}/{family}".encode()) ^ seed)
    needles = _needles(keys, split, rng)
    place_rng = random.Random(rng.random())

    def build(paragraphs: list[str]) -> Prompt:
        document = _place(paragraphs, needles, depth, random.Random(place_rng.random()))
        if form == "raw":
            return f"{INTROS[split][0]}{document}\n\n{needles.question} {needles.answer_start}"
        messages = [{"role": "user", "content": f"{document}\n\n{needles.question} Reply with the number."}]
        return with_instruction(messages, INSTRUCTIONS[split][0])  # type: ignore[misc]

    overhead = measure(build([]))
    if overhead >= n_tokens:
        raise ValueError(f"{n_tokens} tokens cannot hold a {family} prompt (its question alone takes {overhead})")
    source = _haystack(haystack, split, 8 * n_tokens + 4000, rng)  # English runs 3-5 characters a token
    sample = "\n\n".join(_trim(source, 20_000))
    per_token = len(sample) / max(1, measure(sample))
    chars = int((n_tokens - overhead) * per_token)
    best: Prompt | None = None
    for _ in range(8):
        prompt = build(_trim(source, chars))
        got = measure(prompt)
        if got <= n_tokens:
            best = prompt
            if got >= 0.98 * n_tokens:
                break
        chars = int(chars * (n_tokens - overhead) / max(1, got - overhead) * (0.995 if got > n_tokens else 1.0))
    if best is None:
        raise RuntimeError(f"could not fit a {family} prompt in {n_tokens} tokens (the last try took {got})")
    return best, needles.expected


def retrieval_families(families: Sequence[str]) -> list[str]:
    """The one-fact families among ``families``: the ones the quality targets are set on."""
    return [f for f in families if parse_family(f.split("/")[-1])[1] == "key"]
