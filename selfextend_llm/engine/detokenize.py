"""Text of a growing answer, one token at a time, at a cost that does not grow with the answer.

Decoding every answer whole at each step (what a stream needs to know what is safe to show) costs
O(answer) per token: quadratic in the answer, and on the batcher's step path, paid for every row.
:class:`IncrementalDetokenizer` is vLLM's and text-generation-inference's scheme instead: decode a short
window twice, ``ids[prefix:read]`` (already shown) and ``ids[prefix:]``, and the new text is what the
second adds to the first.  Decoding both from the same ``prefix`` makes a tokenizer's context-dependent
rules (SentencePiece's dropped leading space, byte-level pieces of one character) act the same on both,
so the pieces join to the whole answer's text.  A window that ends inside a multi-byte character (its
text ends in U+FFFD) shows nothing until the next token completes it.
"""

from __future__ import annotations

from typing import Any

#: Tokens of already shown text decoded again as context for the next piece.
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """The text of ``ids`` pushed one at a time; :attr:`text` is what the pushed ids decode to so far.

    ``tokenizer`` is anything with transformers' ``decode(ids, skip_special_tokens=...)``."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # first id of the context window
        self._read = 0  # ids before this one are in :attr:`text`

    def push(self, token: int) -> str:
        """Add ``token``; return the text it completes ("" while a character is still incomplete)."""
        self.ids.append(int(token))
        decode = self._tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=self._skip)
        after = decode(self.ids[self._prefix :], skip_special_tokens=self._skip)
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            if not after.startswith(before) and not after.endswith("\ufffd"):
                # the window's context decodes differently with the new token (a tokenizer that cleans up
                # spaces across tokens): take the whole answer's text once, so nothing shown is ever wrong
                return self._resync()
            return ""
        new = after[len(before) :]
        self.text += new
        self._prefix, self._read = max(0, len(self.ids) - CONTEXT_TOKENS), len(self.ids)
        return new

    def _resync(self) -> str:
        whole = self._tokenizer.decode(self.ids, skip_special_tokens=self._skip)
        if not whole.startswith(self.text) or whole.endswith("\ufffd"):
            return ""  # shown text is final; what differs waits for the next token
        new = whole[len(self.text) :]
        self.text = whole
        self._prefix, self._read = max(0, len(self.ids) - CONTEXT_TOKENS), len(self.ids)
        return new

    def finish(self) -> str:
        """Text held back at the end (an incomplete character), as the whole answer decodes it."""
        whole = self._tokenizer.decode(self.ids, skip_special_tokens=self._skip)
        new = whole[len(self.text) :] if whole.startswith(self.text) else ""
        self.text += new
        return new
