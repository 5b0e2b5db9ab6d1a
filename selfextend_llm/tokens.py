"""A long text's token ids in parallel pieces, exactly the ids of the whole text.

At 64k tokens, encoding the document is most of what ``complete()`` adds to the model's own time to first
token (0.1-0.2 s of Rust BPE on one core, against ~0.45 s of prefill on an H100).  The tokenizers library
encodes a *batch* on all cores, so a long text is cut into pieces and encoded as one batch.

Cutting is exact only where no pre-token of the whole text crosses the cut.  For the byte-level BPE of
GPT-2's regex (SmolLM2, GPT-2, StarCoder, ...) a cut just before a space that has an ASCII letter or digit
on its left and an ASCII letter on its right is such a place: the letter or digit run on the left ends at
the space in every alternative of the regex, and the space starts the next pre-token (`` ?\\p{L}+``) whether
the text starts there or not.  BPE merges never cross pre-tokens, so the pieces' ids joined are the whole
text's ids.  Any other tokenizer (a normalizer, SentencePiece's metaspace, an added token with a space, a
custom split regex) is encoded whole, as before.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

#: Texts shorter than this are encoded whole: below ~16k tokens a single core takes < 40 ms.
MIN_PARALLEL_CHARS = 64_000
#: Smallest piece, in characters: smaller pieces cost more in the batch's overhead than they save.
MIN_PIECE_CHARS = 16_000

_CUT = re.compile(r"(?<=[A-Za-z0-9]) (?=[A-Za-z])")


def _cores() -> int:
    """CPUs this process may run on (a container's or taskset's share, not the host's count)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _splittable(backend: Any) -> bool:
    """Whether ``backend`` (a ``tokenizers.Tokenizer``) is byte-level BPE with GPT-2's regex and nothing
    that looks across a space: the case the module docstring proves exact."""
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - an unusual backend: encode whole
        return False
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None or (spec.get("model") or {}).get("type") != "BPE":
        return False
    if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)):
        return False
    return not any(" " in t.get("content", "") for t in spec.get("added_tokens") or [])


def _specials(backend: Any) -> tuple[list[int], list[int]] | None:
    """The ids the post-processor puts before and after a text (a BOS, say), or None if it does more."""
    bare = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a").ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return None


def cut_points(text: str, pieces: int) -> list[int]:
    """Up to ``pieces - 1`` cut offsets into ``text``, each at a safe place (see the module docstring),
    spread as evenly as the text allows."""
    cuts: list[int] = []
    for k in range(1, pieces):
        m = _CUT.search(text, max(len(text) * k // pieces, cuts[-1] + 1 if cuts else 0))
        if m is None:
            break
        cuts.append(m.start())  # each search starts past the last cut: increasing, no repeats
    return cuts


class ParallelEncoder:
    """Encodes long texts as a batch of pieces where the tokenizer allows it (:func:`_splittable`)."""

    def __init__(self, tokenizer: Any):
        backend = getattr(tokenizer, "_tokenizer", None)
        self._backend = backend if backend is not None and _splittable(backend) else None
        self._specials = _specials(self._backend) if self._backend is not None else None
        if self._specials is None:
            self._backend = None

    @property
    def active(self) -> bool:
        return self._backend is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int] | None:
        """The ids of ``text`` (with the tokenizer's special tokens unless ``add_special_tokens`` is false), or
        None where it should be encoded whole: a short text, a tokenizer this cannot cut exactly, a text
        without a safe place to cut."""
        if self._backend is None or len(text) < MIN_PARALLEL_CHARS:
            return None
        if self._backend.truncation is not None or self._backend.padding is not None:
            return None  # left on by a caller's own tokenizer(..., truncation=True): pieces would be cut or padded
        pieces = min(_cores(), len(text) // MIN_PIECE_CHARS) * 2  # two a core: pieces differ in speed
        cuts = cut_points(text, max(2, pieces))
        if not cuts:
            return None
        bounds = [0, *cuts, len(text)]
        chunks = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        before, after = self._specials if add_special_tokens else ([], [])
        ids = list(before)
        for enc in batch(chunks, add_special_tokens=False):
            ids.extend(enc.ids)
        return ids + after
