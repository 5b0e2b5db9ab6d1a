"""``SelfExtendLLM`` for LlamaIndex: reports the extended window so prompts are packed whole."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.llm import LLM

from selfextend_llm import SelfExtendModel, load_shared
from selfextend_llm.streaming import iterate_in_thread


def _to_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    role = {MessageRole.CHATBOT: "assistant", MessageRole.MODEL: "assistant"}
    return [{"role": role.get(m.role, m.role.value), "content": m.content or ""} for m in messages]


class SelfExtendLLM(LLM):
    """A local RoPE model with SelfExtend, as a LlamaIndex LLM.

    Example:
        .. code-block:: python

            from llama_index.core import Settings
            from llama_index.llms.selfextend import SelfExtendLLM

            llm = SelfExtendLLM()  # embedded SmolLM2, 8k trained -> 32k window
            Settings.llm = llm
            Settings.tokenizer = llm.tokenizer
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: str | None = Field(default=None, description="Hugging Face id or path; None for the embedded default.")
    target_context: int | None = Field(default=None, description="Context to plan G and W for.")
    group_size: int | None = Field(default=None, description="Fixed SelfExtend group size G.")
    neighbor_window: int | None = Field(default=None, description="Fixed SelfExtend neighbor window W.")
    gguf_file: str | None = Field(default=None, description="A GGUF file to load.")
    device: str | None = Field(default=None, description="Torch device; default cuda when available.")
    fast_generation: bool | None = Field(
        default=None,
        description="Decode over a static cache (compiled steps on a GPU); on by default, False opts out.",
    )
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling (with temperature > 0).")
    seed: int | None = Field(default=None, description="Seed for sampling, for repeatable answers.")
    max_new_tokens: int = Field(default=256, gt=0)
    stop: list[str] | None = Field(default=None, description="Stop strings, cut from the output.")
    context_window_override: int | None = Field(
        default=None, description="Advertise a smaller window than the model's (for comparisons)."
    )
    _model: SelfExtendModel = PrivateAttr()

    def __init__(self, selfextend_model: SelfExtendModel | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._model = selfextend_model or load_shared(
            model=self.model,
            target_context=self.target_context,
            group_size=self.group_size,
            neighbor_window=self.neighbor_window,
            gguf_file=self.gguf_file,
            device=self.device,
            fast_generation=self.fast_generation,
        )

    @classmethod
    def class_name(cls) -> str:
        return "SelfExtendLLM"

    @property
    def selfextend_model(self) -> SelfExtendModel:
        return self._model

    @property
    def metadata(self) -> LLMMetadata:
        m = self._model
        return LLMMetadata(
            context_window=self.context_window_override or m.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=bool(getattr(m.tokenizer, "chat_template", None)),
            is_function_calling_model=False,
            model_name=m.model_name,
        )

    @property
    def tokenizer(self) -> Callable[[str], list[int]]:
        """For ``Settings.tokenizer``: counts with the model's own tokenizer (any text, even empty)."""
        return self._model.tokenize

    # ------------------------------------------------------------------ helpers
    def _params(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        stop = list(kwargs.pop("stop", None) or []) + list(self.stop or [])
        return {
            "max_new_tokens": kwargs.pop("max_new_tokens", kwargs.pop("max_tokens", self.max_new_tokens)),
            "temperature": kwargs.pop("temperature", self.temperature),
            "top_p": kwargs.pop("top_p", self.top_p),
            "seed": kwargs.pop("seed", self.seed),
            "stop": stop or None,
        }

    def _completion_prompt(self, prompt: str, formatted: bool) -> str | list[dict[str, str]]:
        if not formatted:
            prompt = self.completion_to_prompt(prompt) if self.completion_to_prompt else prompt
            if self.metadata.is_chat_model:
                messages = []
                if self.system_prompt:
                    messages.append({"role": "system", "content": self.system_prompt})
                return [*messages, {"role": "user", "content": prompt}]
        return prompt

    def _checked(self, prompt: str | list[dict[str, str]]) -> str | list[dict[str, str]]:
        self._model.check_fits(self._model.count_tokens(prompt))  # before any generation starts
        return prompt

    # ------------------------------------------------------------------ completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        done = self._model.complete_shared(
            self._checked(self._completion_prompt(prompt, formatted)), **self._params(kwargs)
        )
        return CompletionResponse(
            text=done.text,
            raw=_raw(done.finish_reason, done.prompt_tokens, done.completion_tokens),
        )

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        full = self._checked(self._completion_prompt(prompt, formatted))  # formatting applies to streams too
        params = self._params(kwargs)

        def gen() -> CompletionResponseGen:
            text = ""
            for piece in self._model.stream_chunks(full, **params):
                text += piece.text
                if piece.finish_reason is None:
                    yield CompletionResponse(text=text, delta=piece.text)
                else:  # the last response carries the usage (TokenCountingHandler reads raw["usage"])
                    raw = _raw(piece.finish_reason, piece.prompt_tokens, piece.completion_tokens)
                    yield CompletionResponse(text=text, delta=piece.text, raw=raw)

        return gen()

    # ------------------------------------------------------------------ chat
    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> list[dict[str, str]] | str:
        if self.metadata.is_chat_model:
            return _to_dicts(messages)
        return self.messages_to_prompt(messages)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        done = self._model.complete_shared(self._checked(self._chat_prompt(messages)), **self._params(kwargs))
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=done.text),
            raw=_raw(done.finish_reason, done.prompt_tokens, done.completion_tokens),
        )

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        prompt = self._checked(self._chat_prompt(messages))
        params = self._params(kwargs)

        def gen() -> ChatResponseGen:
            text = ""
            for piece in self._model.stream_chunks(prompt, **params):
                text += piece.text
                message = ChatMessage(role=MessageRole.ASSISTANT, content=text)
                if piece.finish_reason is None:
                    yield ChatResponse(message=message, delta=piece.text)
                else:
                    raw = _raw(piece.finish_reason, piece.prompt_tokens, piece.completion_tokens)
                    yield ChatResponse(message=message, delta=piece.text, raw=raw)

        return gen()

    # ------------------------------------------------------------------ async: the model runs in a worker thread
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self.complete, prompt, formatted, **kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return iterate_in_thread(self.stream_complete(prompt, formatted, **kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return iterate_in_thread(self.stream_chat(messages, **kwargs))


def _raw(finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """Response ``raw``: the counts at the top level and, as OpenAI shapes them, under ``usage``."""
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return {"finish_reason": finish_reason, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "usage": usage}  # fmt: skip
