"""JSON that is valid by construction: constrained decoding with xgrammar.

A request's ``response_format`` (OpenAI's shapes: ``{"type": "json_object"}``, ``{"type":
"json_schema", "json_schema": {"schema": ...}}``, or a bare JSON schema) is compiled once into a
grammar over the model's vocabulary; at every step a per-request matcher masks the tokens that
could not continue a valid document, so a 135M model writes schema-valid JSON every time, where
asking in the prompt alone gave broken JSON.  The same :class:`Constraint` serves
``model.generate`` (as a logits processor) and the continuous batcher (row by row).

xgrammar was chosen over llguidance, lm-format-enforcer and outlines-core by measured per-token
cost on this machine's CPU (``benchmarks/constrained_decoding.py``, BENCHMARKS.md "Constrained
decoding"); it is what vLLM and SGLang use by default.  Optional: ``pip install 'selfextend-llm[json]'``.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Mapping
from typing import Any

import torch

from .validation import missing_extra

_COMPILE_LOCK = threading.Lock()


def _xgrammar():
    try:
        import xgrammar
    except ModuleNotFoundError as err:
        raise missing_extra("xgrammar", "json") from err
    return xgrammar


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
        return dict(schema)
    if kind is None or kind == "object":  # a bare JSON schema
        return dict(response_format)
    raise ValueError(f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'")


class JSONGrammars:
    """Compiled grammars for one tokenizer, cached by schema (compiling takes milliseconds to seconds)."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        xgr = _xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info)
        self.vocab_size = vocab_size

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one instance per model, kept as long as the model
    def _compiled(self, key: str):
        with _COMPILE_LOCK:
            try:
                return self._compiler.compile_json_schema(key, any_whitespace=False)
            except Exception as err:  # xgrammar raises RuntimeError/ValueError subclasses for bad schemas
                raise ValueError(
                    f"the JSON schema cannot be compiled into a grammar ({err}); simplify it or send "
                    "{'type': 'json_object'}"
                ) from err

    def constraint(self, response_format: Mapping[str, Any] | None) -> Constraint | None:
        """A fresh per-request constraint (None: free text).  A bad schema raises ``ValueError`` now."""
        schema = schema_of(response_format)
        if schema is None:
            return None
        # json_object is any JSON *object* (OpenAI's JSON mode), not any JSON value
        key = '{"type": "object"}' if schema is True else json.dumps(schema)  # property order is the output order
        return Constraint(self._compiled(key), self.vocab_size)


class Constraint:
    """One request's grammar state: masks logits to valid continuations, advances on each token."""

    def __init__(self, compiled: Any, vocab_size: int):
        xgr = _xgrammar()
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """Forbid, in place, every token of ``logits`` (``vocab`` or ``1 x vocab``) that breaks the grammar."""
        self.matcher.fill_next_token_bitmask(self._bitmask)
        row = logits.view(1, -1)
        if row.device.type == "cpu" and row.dtype == torch.float32:
            self._xgr.apply_token_bitmask_inplace(row, self._bitmask)
        else:  # xgrammar's kernels cover float32 on the CPU; elsewhere mask through a boolean row
            allowed = _unpack(self._bitmask, row.shape[-1]).to(row.device)
            row.masked_fill_(~allowed, float("-inf"))
        return logits

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)

    @property
    def finished(self) -> bool:
        """The document is complete (only end-of-text may follow)."""
        return self.matcher.is_terminated()


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
