"""LangChain's standard unit suite for ChatSelfExtend on the embedded default model."""

from __future__ import annotations

from langchain_selfextend import ChatSelfExtend
from langchain_tests.unit_tests import ChatModelUnitTests


class TestChatSelfExtendUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatSelfExtend]:
        return ChatSelfExtend

    @property
    def chat_model_params(self) -> dict:
        return {}

    @property
    def has_tool_calling(self) -> bool:
        # SmolLM2's chat template renders no tools; bind_tools raises a clear error for it.
        return False

    @property
    def has_structured_output(self) -> bool:
        # Offered through JSON prompting, but a 135M model does not write schema-valid JSON reliably.
        return False

    @property
    def supports_model_override(self) -> bool:
        return False  # a per-call `model=` would mean loading other weights mid-chain; pick the model at init
