"""``SelfExtendLLM``: completion-style LangChain LLM over the same shared models."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import ConfigDict, Field, model_validator

from selfextend_llm import SelfExtendModel, load_shared


class SelfExtendLLM(BaseLLM):
    """Raw text completion with SelfExtend (no chat template), for completion-style chains."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=())

    model: str | None = None
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
    stop: list[str] | None = None
    selfextend_model: SelfExtendModel | None = Field(default=None, exclude=True, alias="client")

    @model_validator(mode="after")
    def _load(self) -> SelfExtendLLM:
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
        return self

    @property
    def _llm_type(self) -> str:
        return "selfextend"

    @property
    def context_window(self) -> int:
        return self.selfextend_model.context_window

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.selfextend_model.model_name, "temperature": self.temperature}

    def get_token_ids(self, text: str) -> list[int]:
        return self.selfextend_model.tokenize(text)

    def _params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {
            "max_new_tokens": kwargs.get("max_tokens", self.max_tokens),
            "temperature": kwargs.get("temperature", self.temperature),
            "stop": list(stop or []) + list(self.stop or []) or None,
        }

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        model = self.selfextend_model
        for p in prompts:  # fail before any work
            model.check_fits(model.count_tokens(p))
        params = self._params(stop, kwargs)
        if len(prompts) > 1:  # batch(): every prompt a row of one continuously batched generation
            handles = [model.batcher().submit(p, **params) for p in prompts]
            results = [h.result() for h in handles]
        else:
            results = [model.complete_shared(prompts[0], **params)]
        gens = []
        for done in results:
            gens.append(
                [
                    Generation(
                        text=done.text,
                        generation_info={
                            "finish_reason": done.finish_reason,
                            "prompt_tokens": done.prompt_tokens,
                            "completion_tokens": done.completion_tokens,
                        },
                    )
                ]
            )
        return LLMResult(generations=gens, llm_output={"model_name": model.model_name})

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        return await asyncio.to_thread(self._generate, prompts, stop, None, **kwargs)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        for piece in self.selfextend_model.stream(prompt, **self._params(stop, kwargs)):
            chunk = GenerationChunk(text=piece)
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
