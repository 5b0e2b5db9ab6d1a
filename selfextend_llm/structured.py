"""JSON that is valid by construction: constrained decoding with llguidance.

A request's ``response_format`` (OpenAI's shapes: ``{"type": "json_object"}``, ``{"type":
"json_schema", "json_schema": {"schema": ...}}``, or a bare JSON schema) becomes a grammar over the
model's vocabulary; at every step a per-request matcher masks the tokens that could not continue a
valid document, so a 135M model writes schema-valid JSON every time, where asking in the prompt
alone gave none (BENCHMARKS.md "Constrained decoding").  The same :class:`Constraint` serves
``model.generate`` (as a logits processor) and the continuous batcher (row by row).

llguidance was chosen over xgrammar by measured per-token cost on this machine's CPU
(``benchmarks/constrained_decoding.py``: 44-74 us per token against xgrammar's 190 us on schemas; both far
below a 40 ms decode step) and because it compiles schemas lazily (no per-schema precompute on the
request path).  A core dependency: structured output and forced tool calls work from the default install.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import validation


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ModuleNotFoundError as err:
        raise ImportError(
            "llguidance is missing, though selfextend-llm depends on it (a --no-deps install?); run: pip install "
            "'llguidance>=0.7'"
        ) from err
    return llguidance


def schema_of(response_format: Mapping[str, Any] | None) -> dict[str, Any] | None | bool:
    """The JSON schema a ``response_format`` asks for: a dict, True for any JSON object, None for free text.

    Raises ``ValueError`` naming what to change for shapes it does not know.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise TypeError(f"response_format must be a dict, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind in (None, "text") and "properties" not in response_format and "$ref" not in response_format:
        if kind == "text":
            return None
        raise ValueError(
            "response_format needs a 'type' ('json_object' or 'json_schema') or a JSON schema with 'properties'"
        )
    if kind == "json_object":
        return True
    if kind == "json_schema":
        inner = response_format.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, Mapping) else None
        if not isinstance(schema, Mapping):
            raise ValueError("response_format {'type': 'json_schema'} needs json_schema.schema, a JSON schema object")
        validation.json_schema(schema, "response_format's schema")
        return dict(schema)
    if kind is None or kind == "object":  # a bare JSON schema
        validation.json_schema(response_format, "response_format's schema")
        return dict(response_format)
    raise ValueError(f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'")


def json_instruction(response_format: Mapping[str, Any] | None) -> str | None:
    """What to tell the model beside the constraint (it writes better content when it knows the schema)."""
    schema = schema_of(response_format)
    if schema is None:
        return None
    if schema is True:
        return "Answer with one JSON object and nothing else."
    return "Answer with one JSON object that matches this JSON schema, and nothing else:\n" + json.dumps(schema)


class JSONGrammars:
    """Grammars for one tokenizer: checked once per schema, a matcher per request."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        llg = _llguidance()
        self._llg = llg
        self._tokenizer = llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=tokenizer.eos_token_id)
        self.eos = tokenizer.eos_token_id
        self.vocab_size = vocab_size
        self._checked: dict[str, str] = {}
        self._hf_tokenizer = tokenizer
        self._closers: Closers | None = None

    @property
    def closers(self) -> Closers:
        """The tokenizer's closing tokens, classified once (~0.2 s over a 49k vocabulary) on first use."""
        if self._closers is None:
            self._closers = Closers.of(self._hf_tokenizer, self.vocab_size)
        return self._closers

    def _compiled(self, key: str, make: Any, what: str) -> str:
        """A grammar checked against this tokenizer once (``make()`` builds it on a miss)."""
        if key not in self._checked:
            grammar = make()
            error = self._llg.LLMatcher.validate_grammar(grammar, self._tokenizer)
            if error:
                raise ValueError(f"{what} cannot be compiled into a grammar ({error}); simplify it")
            if len(self._checked) > 256:
                self._checked.clear()
            self._checked[key] = grammar
        return self._checked[key]

    def _grammar(self, schema: Mapping[str, Any]) -> str:
        key = json.dumps(schema)  # property order is the output order
        return self._compiled(
            key,
            lambda: self._llg.LLMatcher.grammar_from_json_schema(key, defaults={"whitespace_flexible": False}),
            "the JSON schema (send {'type': 'json_object'} for any object)",
        )

    def _new(self, grammar: str, tail: int = 1) -> Constraint:
        matcher = self._llg.LLMatcher(self._tokenizer, grammar)
        return Constraint(self._llg, matcher, self.vocab_size, self.eos, closers=self.closers, tail=tail)

    def constraint(self, response_format: Mapping[str, Any] | None) -> Constraint | None:
        """A fresh per-request constraint (None: free text).  A bad schema raises ``ValueError`` now."""
        schema = schema_of(response_format)
        if schema is None:
            return None
        # json_object is any JSON *object* (OpenAI's JSON mode), not any JSON value
        return self._new(self._grammar({"type": "object"} if schema is True else schema))

    def tool_call(self, tools: Sequence[Mapping[str, Any]], name: str | None) -> Constraint:
        """A constraint to exactly one ``<tool_call>`` of ``name`` (any offered tool when None), arguments
        valid for its schema: how ``tool_choice`` "required" or a named tool is enforced."""
        from .tools import call_grammar

        lark = call_grammar(tools, name)
        grammar = self._compiled(
            "lark:" + lark,
            lambda: self._llg.LLMatcher.grammar_from_lark(lark),
            "a tool's parameters schema",
        )
        return self._new(grammar, tail=TOOL_CALL_TAIL)


#: Tokens a constraint keeps in hand for what follows the JSON: end-of-text (1), or a tool call's closing
#: ``\n</tool_call>`` and end-of-text.
TOOL_CALL_TAIL = 8
#: Extra tokens of slack before the closing mode starts (a required key the grammar still has to write).
CLOSING_SLACK = 4


class Closers:
    """The vocabulary's tokens that end JSON quickly, best first: how a constrained answer closes in budget.

    ``close``: tokens made only of ``"``, ``}`` and ``]`` (the more brackets, the better); ``values``: the
    shortest complete values (``0``, ``""``, ``null``, ``[]``, ``{}``, ...), for a key that still needs one."""

    def __init__(self, close: list[int], values: list[int], text: dict[int, str]):
        self.close, self.values, self.text = close, values, text

    @classmethod
    def of(cls, tokenizer: Any, vocab_size: int) -> Closers:
        close: list[tuple[int, int]] = []
        values: list[tuple[int, int]] = []
        texts: dict[int, str] = {}
        shortest = {"0": 0, '""': 1, "[]": 2, "{}": 3, "null": 4, "1": 5, "true": 6, "false": 7}
        ids = list(range(min(vocab_size, len(tokenizer))))
        for token, raw in zip(ids, tokenizer.batch_decode([[t] for t in ids]), strict=True):
            text = raw.strip()
            if text and set(text) <= set('"}]'):
                close.append((-len(text), token))
                texts[token] = raw
            elif text in shortest:
                values.append((shortest[text], token))
        return cls([t for _, t in sorted(close)], [t for _, t in sorted(values)], texts)


class _Scanner:
    """How many JSON structures the text so far leaves open (objects, arrays, a string): a lower bound on
    the tokens still needed to close it."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.in_string = self.escaped = False

    def feed(self, text: str) -> None:
        for ch in text:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.stack.append(ch)
            elif ch in "}]" and self.stack:
                self.stack.pop()

    @property
    def open(self) -> int:
        return len(self.stack) + self.in_string

    def open_after(self, text: str) -> int:
        """What :attr:`open` would be after ``text`` (this scanner unchanged)."""
        other = _Scanner()
        other.stack, other.in_string, other.escaped = list(self.stack), self.in_string, self.escaped
        other.feed(text)
        return other.open


class UnsatisfiableError(ValueError):
    """The grammar has no valid continuation (an unsatisfiable schema, or a token the grammar refused)."""


class Constraint:
    """One request's grammar state: masks logits to valid continuations, advances on each token.

    A matcher in error (nothing valid can follow) raises :class:`UnsatisfiableError` rather than
    letting end-of-text through: a cut document reported as finished would be silent garbage."""

    def __init__(
        self, llg: Any, matcher: Any, vocab_size: int, eos: int | None, *, closers: Closers | None = None, tail: int = 1
    ):
        self._llg, self.matcher, self.vocab_size, self.eos = llg, matcher, vocab_size, eos
        self._bitmask = llg.torch.allocate_token_bitmask(1, vocab_size)
        self.closers, self.tail = closers, tail
        #: Tokens this answer may still take (None: no limit); set by the caller from ``max_tokens``.
        self.budget: int | None = None
        self.used = 0
        self._scanner = _Scanner()

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """Forbid, in place, every token of ``logits`` (``vocab`` or ``1 x vocab``) that breaks the grammar.
        Once the document is complete only end-of-text is left."""
        row = logits.view(1, -1)
        if self.matcher.is_error():
            raise UnsatisfiableError(
                f"the constraint has no valid continuation ({self.matcher.get_error()}); check that the schema can "
                "be satisfied"
            )
        if self.finished and self.eos is not None:
            keep = row[0, self.eos].clone()
            row.fill_(float("-inf"))
            row[0, self.eos] = keep
            return logits
        self._llg.torch.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        if self._closing():
            self._close(row)
        if row.dtype == torch.float32:
            self._llg.torch.apply_token_bitmask_inplace(row, self._bitmask.to(row.device))
        else:  # mask through a boolean row for half precision
            allowed = _unpack(self._bitmask, row.shape[-1]).to(row.device)
            row.masked_fill_(~allowed, float("-inf"))
        return logits

    def accept(self, token: int, text: str | None = None) -> None:
        """Advance on ``token`` (``text``: its decoded text, which tracks how much JSON is left open)."""
        self.used += 1
        if text is not None:
            self._scanner.feed(text)
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)

    def _closing(self) -> bool:
        """Whether the budget left is down to what closing the document takes (plus a little slack)."""
        if self.budget is None or self.closers is None:
            return False
        left = self.budget - self.used
        return left <= self._scanner.open + self.tail + CLOSING_SLACK

    def _close(self, row: torch.Tensor) -> None:
        """Keep only the allowed token that closes the most (else the shortest allowed value), when there is one.

        Inside a string ``]]]`` is only text: each candidate is judged by how many structures it leaves
        open afterwards, and only one that closes something counts."""
        allowed = _unpack(self._bitmask, row.shape[-1])
        now, best = self._scanner.open, None
        for token in self.closers.close:
            if token < allowed.shape[0] and allowed[token]:
                after = self._scanner.open_after(self.closers.text[token])
                if after < now and (best is None or after < best[0]):
                    best = (after, token)
        if best is None:
            best = next(((0, t) for t in self.closers.values if t < allowed.shape[0] and allowed[t]), None)
        if best is not None:
            keep = row[0, best[1]].clone()
            row.fill_(float("-inf"))
            row[0, best[1]] = keep
        # else nothing that closes is allowed here (a required key, a literal): the grammar's own choice goes on

    @property
    def finished(self) -> bool:
        """The document is complete (only end-of-text may follow)."""
        return self.matcher.is_stopped() and not self.matcher.is_error()


def _unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = torch.arange(32, dtype=torch.int32)
    words = bitmask.view(-1)
    return ((words[:, None] >> bits) & 1).view(-1)[:vocab].bool()


class ConstrainedLogits:
    """``model.generate`` logits processor applying one :class:`Constraint` per batch row (``decode``: the
    tokenizer's decode, which lets each constraint see how much JSON is open)."""

    def __init__(self, constraints: list[Constraint], prompt_len: int, decode: Any = None):
        self.constraints, self.prompt_len, self.decode = constraints, prompt_len, decode

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_len:
            for row, constraint in enumerate(self.constraints):
                token = int(input_ids[row, -1])
                constraint.accept(token, None if self.decode is None else self.decode([token]))
        for row, constraint in enumerate(self.constraints):
            constraint.mask_(scores[row])
        return scores
