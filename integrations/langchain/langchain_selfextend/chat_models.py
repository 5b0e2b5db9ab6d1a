"""``ChatSelfExtend``: a local chat model whose extended context window LangChain can see."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field, model_validator

from selfextend_llm import SelfExtendModel, load_shared
from selfextend_llm.streaming import iterate_in_thread
from selfextend_llm.structured import json_instruction
from selfextend_llm.tools import check_tools, closed_schema, resolve_choice

from ._messages import to_chat_dicts


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageMetadata:
    """LangChain's usage block; ``cache_read``: prompt tokens whose keys came from the prefix cache (a second
    question about one document reads it from there)."""
    return UsageMetadata(
        input_tokens=prompt_tokens, output_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens,
        input_token_details={"cache_read": cached_tokens},
    )  # fmt: skip


def _extract_json(text: str) -> Any:
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise OutputParserException(f"model output contains no JSON: {text[:200]!r}", llm_output=text)
    decoder = json.JSONDecoder()
    try:
        value, _ = decoder.raw_decode(text[start:])
    except json.JSONDecodeError as err:
        raise OutputParserException(f"model output is not valid JSON ({err}): {text[:200]!r}", llm_output=text) from err
    return value


class ChatSelfExtend(BaseChatModel):
    """Chat model over a local RoPE LLM with SelfExtend.

    ``profile["max_input_tokens"]`` is the *extended* window, so stuff-style chains and
    middleware that read it send whole documents in one call.  ``profile["quality_context"]`` is
    how far answers were measured to hold (held-out retrieval at the bar, raw and chat; None where
    not measured): a chain that wants measured quality splits documents longer than that.

    Example:
        .. code-block:: python

            from langchain_selfextend import ChatSelfExtend

            llm = ChatSelfExtend()  # embedded SmolLM2, window 8k -> 32k
            llm.invoke("Summarise: " + open("report.txt").read())
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=())

    model: str | None = None
    """Hugging Face id or local path; None for the embedded SmolLM2 default."""
    target_context: int | None = None
    """Context to plan G and W for (default: 4x the trained window); the advertised window."""
    group_size: int | None = None
    """Fixed group size G (default: the model's tuned table, length by length)."""
    neighbor_window: int | None = None
    """Fixed neighbor window W (keys this close keep their exact positions)."""
    log_scale: float | None = None
    """With ``group_size``: strength of log-scaled queries (1: LongLM's log(pos)/log(L); default off)."""
    gguf_file: str | None = None
    device: str | None = None
    fast_generation: bool | None = None
    """Decode over a static cache (compiled steps on a GPU); on by default, False keeps the dynamic cache."""
    temperature: float = 0.0
    max_tokens: int = Field(default=256, alias="max_new_tokens")
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    streaming: bool = False
    timeout: float | None = None
    """Seconds after which generation stops (passed to transformers as ``max_time``)."""
    max_retries: int = 2
    """Accepted for API compatibility with hosted models; local generation has nothing to retry."""
    top_p: float | None = None
    top_k: int | None = None
    """Sample among the k likeliest tokens only (None or 0: all)."""
    min_p: float | None = None
    """Drop tokens below ``min_p`` times the likeliest one's probability."""
    repetition_penalty: float | None = None
    """Penalise tokens already in the prompt or answer (>1 discourages repeats; transformers' rule)."""
    seed: int | None = None
    selfextend_model: SelfExtendModel | None = Field(default=None, exclude=True, alias="client")
    """An already loaded :class:`selfextend_llm.SelfExtendModel` to use instead of loading one."""

    @model_validator(mode="after")
    def _load(self) -> ChatSelfExtend:
        if self.selfextend_model is None:
            self.selfextend_model = load_shared(
                model=self.model,
                target_context=self.target_context,
                group_size=self.group_size,
                neighbor_window=self.neighbor_window,
                log_scale=self.log_scale,
                gguf_file=self.gguf_file,
                device=self.device,
                fast_generation=self.fast_generation,
            )
        if self.profile is None:
            tools = self.selfextend_model.supports_tools
            self.profile = {
                "name": self.selfextend_model.model_name,
                "open_weights": True,
                "max_input_tokens": self.selfextend_model.context_window,
                # selfextend-llm's own: up to here held-out retrieval was measured to hold (None: not measured);
                # max_input_tokens is the hard limit
                "quality_context": self.selfextend_model.quality_context,
                "max_output_tokens": self.selfextend_model.context_window,
                "text_inputs": True,
                "text_outputs": True,
                "image_inputs": False,
                "audio_inputs": False,
                "video_inputs": False,
                "pdf_inputs": False,
                "tool_calling": tools,
                "tool_choice": tools,
                "structured_output": tools,
                "reasoning_output": False,
            }
        return self

    # ------------------------------------------------------------------ identity
    @property
    def _llm_type(self) -> str:
        return "selfextend-chat"

    @property
    def model_name(self) -> str:
        return self.selfextend_model.model_name

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, **self.selfextend_model.describe(), "temperature": self.temperature}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "selfextend"
        params["ls_model_name"] = kwargs.get("model") or self.model_name
        params["ls_model_type"] = "chat"
        params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        params["ls_max_tokens"] = kwargs.get("max_tokens", self.max_tokens)
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    # ------------------------------------------------------------------ tokens
    def get_token_ids(self, text: str) -> list[int]:
        return self.selfextend_model.tokenize(text)

    def get_num_tokens(self, text: str) -> int:
        return len(self.get_token_ids(text))

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[dict[str, Any] | type | Callable | BaseTool] | None = None
    ) -> int:
        formatted = [convert_to_openai_tool(t) for t in tools] if tools else None
        return len(self.selfextend_model.encode(to_chat_dicts(messages), tools=formatted))

    # ------------------------------------------------------------------ generation
    def _call_args(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]):
        override = kwargs.pop("model", None)
        if override not in (None, self.model, self.model_name):
            raise ValueError(
                f"per-call model={override!r} is not supported: this ChatSelfExtend holds {self.model_name!r} "
                "in memory; "
                "create another ChatSelfExtend for another model"
            )
        tools = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        response_format = kwargs.pop("response_format", None)
        chat = to_chat_dicts(messages)
        model = self.selfextend_model
        if response_format is not None:
            chat = model.with_instruction(chat, json_instruction(response_format))
        if tool_choice in ("none", False):
            tools, tool_choice = None, None
        params: dict[str, Any] = {
            "max_new_tokens": kwargs.pop("max_tokens", kwargs.pop("max_new_tokens", self.max_tokens)),
            "temperature": kwargs.pop("temperature", self.temperature),
            "stop": list(stop or []) + list(self.stop or []) or None,
            "top_p": kwargs.pop("top_p", self.top_p),
            "seed": kwargs.pop("seed", self.seed),
            "top_k": kwargs.pop("top_k", self.top_k),
            "min_p": kwargs.pop("min_p", self.min_p),
            "repetition_penalty": kwargs.pop("repetition_penalty", self.repetition_penalty),
            "tools": tools,
            "tool_choice": tool_choice,  # forced choices are held to one valid call (constrained decoding)
        }
        if response_format is not None:  # JSON valid by construction (constrained decoding)
            params["response_format"] = response_format
        if self.timeout is not None:
            params["max_time"] = self.timeout
        return chat, params

    def _message(
        self, text: str, prompt_tokens: int, completion_tokens: int, finish: str, tools: bool, cached_tokens: int = 0
    ) -> AIMessage:
        content, parsed = self.selfextend_model.parse_tool_calls(text) if tools else (text, [])
        calls = [{"name": c.name, "args": c.arguments, "id": c.id} for c in parsed if c.error is None]
        invalid = [
            {"name": None, "args": c.raw, "id": c.id, "error": c.error, "type": "invalid_tool_call"}
            for c in parsed
            if c.error is not None
        ]
        return AIMessage(
            content=content,
            tool_calls=calls,
            invalid_tool_calls=invalid,
            usage_metadata=_usage(prompt_tokens, completion_tokens, cached_tokens),
            response_metadata={
                "model_name": self.model_name,
                "finish_reason": "tool_calls" if calls else finish,
                "model_provider": "selfextend",
            },
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))
        chat, params = self._call_args(messages, stop, kwargs)
        done = self.selfextend_model.complete_shared(chat, **params)  # concurrent calls share decode steps
        message = self._message(
            done.text, done.prompt_tokens, done.completion_tokens, done.finish_reason, bool(params["tools"]),
            done.cached_tokens,
        )  # fmt: skip
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={"model_name": self.model_name})

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        chat, params = self._call_args(messages, stop, kwargs)
        tools, held = bool(params["tools"]), []
        for piece in self.selfextend_model.stream_shared(chat, **params):
            if piece.finish_reason is None and tools:
                held.append(piece.text)  # a <tool_call> block must not stream out as content
                continue
            if piece.finish_reason is None:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece.text))
                if run_manager:
                    run_manager.on_llm_new_token(piece.text, chunk=chunk)
            else:
                content, calls = self.selfextend_model.parse_tool_calls("".join(held)) if tools else ("", [])
                # An unparseable call's args go as a JSON *string* (its raw text): LangChain's partial-JSON
                # parser would otherwise "complete" the broken object into a call; a string lands in
                # invalid_tool_calls, as it must.
                call_chunks = [
                    {"name": c.name or None, "args": json.dumps(c.raw) if c.error else json.dumps(c.arguments),
                     "id": c.id, "index": i, "type": "tool_call_chunk"}
                    for i, c in enumerate(calls)
                ]  # fmt: skip
                if run_manager and content:
                    run_manager.on_llm_new_token(content)
                chunk = ChatGenerationChunk(
                    message=AIMessageChunk(
                        content=content,
                        tool_call_chunks=call_chunks,
                        usage_metadata=_usage(piece.prompt_tokens, piece.completion_tokens, piece.cached_tokens),
                        response_metadata={
                            "model_name": self.model_name,
                            "finish_reason": "tool_calls" if call_chunks else piece.finish_reason,
                            "model_provider": "selfextend",
                        },
                        chunk_position="last",
                    )
                )
            yield chunk

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            chunks = [c async for c in self._astream(messages, stop=stop, run_manager=run_manager, **kwargs)]
            merged = chunks[0]
            for c in chunks[1:]:
                merged += c
            return ChatResult(generations=[ChatGeneration(message=merged.message, generation_info=None)])
        # The model runs in a worker thread; the event loop stays free.
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # The whole stream runs in one worker thread; leaving early cancels the generation.
        async for chunk in iterate_in_thread(self._stream(messages, stop=stop, **kwargs)):
            if run_manager and chunk.message.content:
                await run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk

    # ------------------------------------------------------------------ tools and structured output
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | dict | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer tools: through the chat template where it renders tools, else in the documented prompted format.

        ``tool_choice``: "auto" (default), "none", "any"/"required"/True (some call) or a tool's name; a
        forced choice is decoded under a grammar, so the answer is one call with schema-valid arguments.
        """
        if isinstance(tool_choice, dict):
            tool_choice = tool_choice.get("function", {}).get("name") or tool_choice.get("name")
        elif tool_choice is True:
            tool_choice = "any"
        formatted = [convert_to_openai_tool(t) for t in tools]
        # unknown names, bad schemas: an error now, not at the first call
        resolve_choice(check_tools(formatted), tool_choice)
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: Literal["json_schema", "json_mode", "function_calling"] = "json_schema",
        include_raw: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Ask for JSON matching ``schema`` and parse and validate it (a Pydantic class gives instances).

        A reply that is not valid JSON for the schema raises ``OutputParserException``.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments: {sorted(kwargs)}")
        json_schema = closed_schema(convert_to_json_schema(schema)) if method != "json_mode" else None
        llm = self.bind(
            response_format=json_schema or {"type": "json_object"},
            ls_structured_output_format={"kwargs": {"method": method}, "schema": json_schema},
        )
        is_pydantic = isinstance(schema, type) and issubclass(schema, BaseModel)

        def parse(message: AIMessage) -> Any:
            text = message.content if isinstance(message.content, str) else str(message.content)
            if message.response_metadata.get("finish_reason") == "length":
                # valid so far (the decoder held it to the schema), but max_tokens ended it mid-document
                raise OutputParserException(
                    f"max_tokens cut the JSON before it was complete ({len(text)} characters written); raise "
                    f"max_tokens: {text[:200]!r}",
                    llm_output=text,
                )
            data = _extract_json(text)
            if is_pydantic:
                try:
                    return schema.model_validate(data)
                except Exception as err:
                    raise OutputParserException(
                        f"JSON does not match {schema.__name__}: {err}", llm_output=str(message.content)
                    ) from err
            return data

        parser = RunnableLambda(parse)
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")


__all__ = ["ChatSelfExtend"]
