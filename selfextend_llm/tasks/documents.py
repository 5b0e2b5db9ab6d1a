"""A long, seeded "report" with one fact hidden in it, for whole-document QA examples and tests."""

from __future__ import annotations

import random

_TOPICS = ["budget", "staffing", "logistics", "maintenance", "training", "procurement", "safety", "outreach"]
_VERBS = ["reviewed", "discussed", "postponed", "approved", "summarised", "revisited", "noted", "deferred"]


def make_fact_document(n_tokens: int, count_tokens, *, seed: int = 0, depth: float = 0.5) -> tuple[str, str, str]:
    """(document, question, answer): about ``n_tokens`` of meeting minutes hiding one access code."""
    rng = random.Random(seed)
    code = str(rng.randint(10_000, 99_999))
    fact = f"IMPORTANT: the access code for the archive room is {code}. "
    lines = []
    while True:
        n = len(lines) + 1
        lines.append(
            f"Item {n}: the committee {rng.choice(_VERBS)} the {rng.choice(_TOPICS)} report and "
            f"{rng.choice(_VERBS)} the {rng.choice(_TOPICS)} plan. "
        )
        if n % 50 == 0 and count_tokens("".join(lines)) >= n_tokens:
            break
    lines.insert(int(len(lines) * depth), fact)
    return "".join(lines), "What is the access code for the archive room? Reply with the number only.", code
