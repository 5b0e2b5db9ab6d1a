"""Stop strings of any token length, for whole and streamed generations.

A stop string may span several tokens and may be split across streamed pieces, so streaming
holds back any tail of the text that could still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import validation


def normalize_stops(stop: str | Sequence[str] | None) -> list[str]:
    """``stop`` as a list of non-empty strings (a clear ``TypeError`` for anything else)."""
    return validation.stops(stop)


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def emittable(text: str, stops: Sequence[str]) -> int:
    """Length of the prefix of ``text`` that can be shown now: no stop string can start in it."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return len(text) - keep
