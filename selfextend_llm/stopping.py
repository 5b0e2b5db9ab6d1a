"""Stop strings of any token length, for whole and streamed generations.

A stop string may span several tokens and may be split across streamed pieces, so streaming
holds back any tail of the text that could still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

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


@dataclass
class StopScan:
    """What :func:`visible_pieces` saw: all the text so far, and whether a stop string ended it."""

    text: str = ""
    stopped: bool = False


def visible_pieces(pieces: Iterable[str], stops: Sequence[str], scan: StopScan | None = None) -> Iterator[str]:
    """Pass streamed text on as soon as it is safe to show, and stop at the first stop string.

    A piece is held back while its tail could still grow into a stop string (so a stop string
    split across pieces never shows); on a stop string the text before it is yielded and the
    input is no longer read (the caller cancels the producer).  Pure: no I/O, no threads, so
    streaming's hardest rule is tested on plain lists.  ``scan`` receives the full text and
    whether a stop string was hit.
    """
    scan = StopScan() if scan is None else scan
    shown = 0
    for piece in pieces:
        scan.text += piece
        cut = find_stop(scan.text, stops)
        if cut is not None:
            if cut > shown:
                yield scan.text[shown:cut]
            scan.stopped = True
            return
        upto = emittable(scan.text, stops)
        if upto > shown:
            yield scan.text[shown:upto]
            shown = upto
    if len(scan.text) > shown:
        yield scan.text[shown:]
