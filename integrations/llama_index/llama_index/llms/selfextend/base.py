"""``SelfExtendLLM`` for LlamaIndex: reports the extended window so prompts are packed whole."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

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
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.prompts import BasePromptTemplate
from pydantic import BaseModel

from selfextend_llm import SelfExtendModel, load_shared
from selfextend_llm.streaming import iterate_in_thread
from selfextend_llm.structured import json_instruction
from selfextend_llm.tools import closed_schema, keep_unparsed

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

Model = TypeVar("Model", bound=BaseModel)


def _to_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages as chat-template dicts: tool calls (``ToolCallBlock``) and tool results kept."""
    role = {MessageRole.CHATBOT: "assistant", MessageRole.MODEL: "assistant"}
    out = []
    for m in messages:
        entry: dict[str, Any] = {"role": role.get(m.role, m.role.value), "content": m.content or ""}
        calls = [b for b in m.blocks if isinstance(b, ToolCallBlock)]
        if calls:
            entry["tool_calls"] = [
                {"type": "function", "id": c.tool_call_id, "function": {"name": c.tool_name, "arguments": args}}
                for c in calls
                for args in [c.tool_kwargs]
            ]
        if m.role == MessageRole.TOOL and m.additional_kwargs.get("tool_call_id"):
            entry["tool_call_id"] = m.additional_kwargs["tool_call_id"]
        out.append(entry)
    return out


def _answer_message(text: str, model: SelfExtendModel | None) -> ChatMessage:
    """The assistant message of an answer: with tools offered (``model`` given), ``<tool_call>`` blocks
    become ``ToolCallBlock``\ s (unparseable ones stay in the text, not lost)."""
    if model is None:
        return ChatMessage(role=MessageRole.ASSISTANT, content=text)
    content, calls = model.parse_tool_calls(text)
    content = keep_unparsed(content, calls)
    blocks: list[Any] = [TextBlock(text=content)] if content else []
    valid = [c for c in calls if c.error is None]
    blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in valid]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks or [TextBlock(text="")])


class SelfExtendMetadata(LLMMetadata):
    """LlamaIndex's metadata, plus how far answers were measured to hold.

    ``context_window`` is the hard (extended) window, which node parsers and response synthesizers fill;
    ``quality_context`` the longest prompt at which held-out retrieval reached the bar, raw and chat
    (None where not measured): a pipeline that wants measured quality keeps prompts below it.
    """

    quality_context: int | None = Field(
        default=None,
        description="longest prompt length (tokens) at which held-out retrieval was measured to hold; None: unknown",
    )


class SelfExtendLLM(FunctionCallingLLM):
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
    log_scale: float | None = Field(
        default=None,
        description="With group_size: strength of log-scaled queries (1: LongLM's log(pos)/log(L); default off).",
    )
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
            log_scale=self.log_scale,
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
    def metadata(self) -> SelfExtendMetadata:
        m = self._model
        return SelfExtendMetadata(
            quality_context=m.quality_context,
            context_window=self.context_window_override or m.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=bool(getattr(m.tokenizer, "chat_template", None)),
            is_function_calling_model=m.supports_tools,
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
            "tools": kwargs.pop("tools", None),
            "tool_choice": kwargs.pop("tool_choice", None),
            "response_format": kwargs.pop("response_format", None),
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

    def _checked(self, prompt: str | list[dict[str, Any]], params: dict[str, Any] | None = None) -> Any:
        """The prompt, after checking (before a stream starts) that it fits and that its tools are valid."""
        params = params or {}
        prompt_, tools, _ = self._model.prepare_tools(prompt, params.get("tools"), params.get("tool_choice"))
        self._model.check_fits(len(self._model.encode(prompt_, tools=tools)))
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
            for piece in self._model.stream_shared(full, **params):
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
        params = self._params(kwargs)
        done = self._model.complete_shared(self._chat_prompt(messages), **params)
        return ChatResponse(
            message=_answer_message(done.text, self._model if _offers(params) else None),
            raw=_raw(done.finish_reason, done.prompt_tokens, done.completion_tokens),
        )

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        prompt = self._checked(self._chat_prompt(messages), self._params(dict(kwargs)))
        params = self._params(kwargs)
        tools = self._model if _offers(params) else None

        def gen() -> ChatResponseGen:
            text = ""
            for piece in self._model.stream_shared(prompt, **params):
                text += piece.text
                if piece.finish_reason is None:
                    if tools is None:  # with tools the text is held: a <tool_call> block is no content
                        yield ChatResponse(message=_answer_message(text, None), delta=piece.text)
                else:
                    raw = _raw(piece.finish_reason, piece.prompt_tokens, piece.completion_tokens)
                    message = _answer_message(text, tools)
                    yield ChatResponse(message=message, delta=message.content if tools else piece.text, raw=raw)

        return gen()

    # ------------------------------------------------------------------ tools (FunctionCallingLLM)
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``chat()`` arguments offering ``tools``; ``tool_required`` (or a ``tool_choice`` naming a tool)
        forces a call, which is then decoded under a grammar (one call, schema-valid arguments)."""
        specs = [t.metadata.to_openai_tool(skip_length_check=True) for t in tools]
        messages = list(chat_history or [])
        if user_msg is not None:
            if isinstance(user_msg, str):
                user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
            messages.append(user_msg)
        if tool_choice is None:
            tool_choice = "required" if tool_required else "auto"
        return {"messages": messages, "tools": specs or None, "tool_choice": tool_choice if specs else None, **kwargs}

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The calls of an answer from ``chat_with_tools`` (or its stream's last response)."""
        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not calls and error_on_no_tool_call:
            raise ValueError(f"expected at least one tool call, got none; the answer was {response.message.content!r}")
        return [
            ToolSelection(tool_id=c.tool_call_id or "", tool_name=c.tool_name, tool_kwargs=c.tool_kwargs) for c in calls
        ]

    # ------------------------------------------------------------------ structured output: constrained decoding
    def _structured_messages(self, output_cls: type[Model], prompt: BasePromptTemplate, prompt_args: dict) -> Any:
        schema = closed_schema(output_cls.model_json_schema())
        chat = _to_dicts(prompt.format_messages(llm=self, **prompt_args))
        return self._model.with_instruction(chat, json_instruction(schema)), schema

    def _parse_structured(self, output_cls: type[Model], text: str) -> Model:
        try:
            return output_cls.model_validate_json(text)
        except ValueError as err:  # cut by max_new_tokens: the JSON is valid so far, but not finished
            raise ValueError(
                f"the answer is not a complete {output_cls.__name__} ({err}); raise max_new_tokens"
            ) from err

    def structured_predict(
        self, output_cls: type[Model], prompt: BasePromptTemplate, llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:  # fmt: skip
        """An ``output_cls`` instance, decoded under the class's JSON schema (valid by construction)."""
        chat, schema = self._structured_messages(output_cls, prompt, prompt_args)
        params = self._params(dict(llm_kwargs or {}))
        params["response_format"] = schema
        return self._parse_structured(output_cls, self._model.complete_shared(chat, **params).text)

    async def astructured_predict(
        self, output_cls: type[Model], prompt: BasePromptTemplate, llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:  # fmt: skip
        return await asyncio.to_thread(self.structured_predict, output_cls, prompt, llm_kwargs, **prompt_args)

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


def _offers(params: dict[str, Any]) -> bool:
    """Whether a call offers tools (so its answer may hold calls)."""
    return bool(params.get("tools")) and params.get("tool_choice") not in ("none", False)


def _raw(finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """Response ``raw``: the counts at the top level and, as OpenAI shapes them, under ``usage``."""
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return {"finish_reason": finish_reason, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "usage": usage}  # fmt: skip
