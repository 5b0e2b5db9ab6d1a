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

    def _new(self, grammar: str) -> Constraint:
        return Constraint(self._llg, self._llg.LLMatcher(self._tokenizer, grammar), self.vocab_size, self.eos)

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
        return self._new(grammar)


class UnsatisfiableError(ValueError):
    """The grammar has no valid continuation (an unsatisfiable schema, or a token the grammar refused)."""


class Constraint:
    """One request's grammar state: masks logits to valid continuations, advances on each token.

    A matcher in error (nothing valid can follow) raises :class:`UnsatisfiableError` rather than
    letting end-of-text through: a cut document reported as finished would be silent garbage."""

    def __init__(self, llg: Any, matcher: Any, vocab_size: int, eos: int | None):
        self._llg, self.matcher, self.vocab_size, self.eos = llg, matcher, vocab_size, eos
        self._bitmask = llg.torch.allocate_token_bitmask(1, vocab_size)

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
        if row.dtype == torch.float32:
            self._llg.torch.apply_token_bitmask_inplace(row, self._bitmask.to(row.device))
        else:  # mask through a boolean row for half precision
            allowed = _unpack(self._bitmask, row.shape[-1]).to(row.device)
            row.masked_fill_(~allowed, float("-inf"))
        return logits

    def accept(self, token: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """The document is complete (only end-of-text may follow)."""
        return self.matcher.is_stopped() and not self.matcher.is_error()


def _unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = torch.arange(32, dtype=torch.int32)
    words = bitmask.view(-1)
    return ((words[:, None] >> bits) & 1).view(-1)[:vocab].bool()


class ConstrainedLogits:
    """``model.generate`` logits processor applying one :class:`Constraint` per batch row."""

    def __init__(self, constraints: list[Constraint], prompt_len: int):
        self.constraints, self.prompt_len = constraints, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_len:
            for row, constraint in enumerate(self.constraints):
                constraint.accept(int(input_ids[row, -1]))
        for row, constraint in enumerate(self.constraints):
            constraint.mask_(scores[row])
        return scores
