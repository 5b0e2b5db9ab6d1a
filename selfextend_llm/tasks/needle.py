"""RULER-style multi-key needle in a haystack: several keyed numbers, one asked for.

Distractor needles carry other keys, so the model must retrieve the value of the right key, not
just any number.  Seeded and reproducible.
"""

from __future__ import annotations

import random

from .passkey import FILLER

KEYS = [
    "amber",
    "basil",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lotus",
    "maple",
    "nectar",
    "orchid",
    "pebble",
    "quartz",
    "raven",
    "saffron",
    "tundra",
    "umber",
    "velvet",
]


def needle_prompt(n_tokens: int, depth: float, seed: int, count_tokens, n_needles: int = 4) -> tuple[str, str]:
    """(prompt, answer): ``n_needles`` keyed 7-digit numbers; the one for the target key sits at ``depth``."""
    rng = random.Random(seed)
    keys = rng.sample(KEYS, n_needles)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}. " for k, v in zip(keys, values, strict=True)]
    question = f"\nWhat is the special magic number for {keys[0]}? The special magic number for {keys[0]} is"
    per = max(1, count_tokens(FILLER * 10) // 10)
    reps = max(n_needles + 1, (n_tokens - count_tokens("".join(needles) + question)) // per)
    slots = [round(reps * depth)] + [rng.randint(0, reps) for _ in needles[1:]]
    chunks: list[str] = []
    for i in range(reps + 1):
        chunks.extend(needle for needle, slot in zip(needles, slots, strict=True) if slot == i)
        if i < reps:
            chunks.append(FILLER)
    return "".join(chunks) + question, values[0]
