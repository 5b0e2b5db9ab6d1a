"""The OpenAI wire format: request models and the response builder, apart from the handlers.

Chat and text completions differ only in the shape of a choice (a message or a delta against
a ``text``); :class:`Responder` builds both, whole and streamed, so the two endpoints cannot drift.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from ..validation import missing_extra

try:
    from pydantic import BaseModel, ConfigDict, Field
except ModuleNotFoundError as err:  # the optional [server] extra
    raise missing_extra("pydantic", "server") from err


class Message(BaseModel):
    """One chat message; text content only (a string or ``{"type": "text"}`` parts)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


#: Fields OpenAI's and vLLM's clients send that change nothing here, accepted by name (any other unknown
#: field is refused: a parameter is never silently ignored).  ``user``/``metadata``/``store``/
#: ``service_tier`` are bookkeeping; ``parallel_tool_calls`` is what this server does anyway (every call
#: the model writes comes back).
NO_EFFECT_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


def _unknown_fields(model: BaseModel) -> str | None:
    """The first field of a request that no model here declares, or None."""
    extra = sorted(k for k in (model.model_extra or {}) if k not in NO_EFFECT_FIELDS)
    return extra[0] if extra else None


class SamplingParams(BaseModel):
    """What both endpoints take.

    Every field is honoured or refused by name: unknown fields are a 400 (``unsupported``), except the
    bookkeeping ones in :data:`NO_EFFECT_FIELDS`.  ``top_k``, ``min_p`` and ``repetition_penalty`` are
    vLLM's and llama-server's extensions (``extra_body`` in the OpenAI client); ``top_k`` -1 means
    every token, as in vLLM."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # Accepted so that they can be refused by name when set (never silently ignored):
    n: int = Field(default=1, ge=1)
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> str | None:
        """The first parameter set to something this server does not do, or None."""
        if self.n != 1:
            return "n"
        if self.logprobs not in (None, False, 0) or self.top_logprobs:
            return "logprobs"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty" if self.presence_penalty else "frequency_penalty"
        if self.logit_bias:
            return "logit_bias"
        return _unknown_fields(self)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampling extensions as the engine takes them (``top_k`` -1 and 0: every token)."""
        return {
            "top_k": None if self.top_k in (None, -1, 0) else self.top_k,
            "min_p": self.min_p or None,
            "repetition_penalty": None if self.repetition_penalty in (None, 1.0) else self.repetition_penalty,
        }


class ChatRequest(SamplingParams):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingParams):
    """``POST /v1/completions``."""

    prompt: str | list[str] = Field(description="one prompt, or a list: one choice per prompt, batched together")
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.best_of not in (None, 1):
            return "best_of"
        if self.suffix:
            return "suffix"
        return super().unsupported()


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: a text prompt, or chat messages counted through the chat template (unknown
    fields are refused, as on the completion endpoints)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None

    def unsupported(self) -> str | None:
        return _unknown_fields(self)


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]

    def unsupported(self) -> str | None:
        return _unknown_fields(self)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage block; ``cached_tokens``: prompt tokens whose keys came from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class Responder:
    """Builds the responses of one request: the whole answer, or the payloads of its stream."""

    kind: Literal["chat", "text"]
    model: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    _role_sent: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

    def _base(self, streamed: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        if streamed and self.kind == "chat":
            kind += ".chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(
        self, text: str, finish_reason: str, index: int = 0, tool_calls: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """One choice of a whole response; with ``tool_calls`` the finish reason is ``"tool_calls"``."""
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_calls:
                message.update(content=text or None, tool_calls=tool_calls)
                finish_reason = "tool_calls"
            out: dict[str, Any] = {"index": index, "message": message}
        else:
            out = {"index": index, "text": text}
        return {**out, "finish_reason": finish_reason, "logprobs": None}

    def whole(
        self,
        text: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        tool_calls: list[dict[str, Any]] | None = None,
        cached_tokens: int = 0,
    ) -> dict[str, Any]:
        """The non-streamed response."""
        choice = self.choice(text, finish_reason, 0, tool_calls)
        used = usage(prompt_tokens, completion_tokens, cached_tokens)
        return {**self._base(False), "choices": [choice], "usage": used}

    def many(
        self, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        """A response with several choices (a list of prompts to ``/v1/completions``)."""
        used = usage(prompt_tokens, completion_tokens, cached_tokens)
        return {**self._base(False), "choices": choices, "usage": used}

    def tool_call_chunk(self, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
        """A streamed delta carrying whole tool calls (OpenAI's ``delta.tool_calls`` with indexes)."""
        calls = [{"index": i, **call} for i, call in enumerate(tool_calls)]
        return {**self._base(True), "choices": [{"index": 0, "delta": {"tool_calls": calls}, "finish_reason": None}]}

    def chunk(
        self,
        text: str,
        finish_reason: str | None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cached_tokens: int = 0,
    ) -> list[dict[str, Any]]:
        """Payloads for one streamed piece: none, the piece, and (last piece) the usage chunk."""
        payloads = []
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": text} if text else {}
            if not self._role_sent:
                delta["role"], self._role_sent = "assistant", True
            if delta or finish_reason is not None:
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
                payloads.append({**self._base(True), "choices": [choice]})
        elif text or finish_reason is not None:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
            payloads.append({**self._base(True), "choices": [choice]})
        if finish_reason is not None and self.include_usage:
            used = usage(prompt_tokens, completion_tokens, cached_tokens)
            payloads.append({**self._base(True), "choices": [], "usage": used})
        return payloads
