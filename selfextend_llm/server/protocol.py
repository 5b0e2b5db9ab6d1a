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


class SamplingParams(BaseModel):
    """What both endpoints take; unknown fields are ignored, as OpenAI's own clients send extras."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(SamplingParams):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingParams):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
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

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The non-streamed response."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(finish_reason=finish_reason, logprobs=None)
        return {**self._base(False), "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(
        self, text: str, finish_reason: str | None, prompt_tokens: int = 0, completion_tokens: int = 0
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
            payloads.append({**self._base(True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        return payloads
