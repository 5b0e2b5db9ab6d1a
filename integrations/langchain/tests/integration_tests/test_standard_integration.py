"""LangChain's standard integration suite for ChatSelfExtend, run on the real embedded default model."""

from __future__ import annotations

from langchain_selfextend import ChatSelfExtend
from langchain_tests.integration_tests import ChatModelIntegrationTests


class TestChatSelfExtendIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatSelfExtend]:
        return ChatSelfExtend

    @property
    def chat_model_params(self) -> dict:
        return {"max_tokens": 48}

    @property
    def has_tool_calling(self) -> bool:
        return False  # the default model's chat template has no tool support

    @property
    def has_structured_output(self) -> bool:
        return False  # a 135M model does not produce schema-valid JSON reliably

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # a per-call `model=` would mean loading other weights mid-chain; pick the model at init
