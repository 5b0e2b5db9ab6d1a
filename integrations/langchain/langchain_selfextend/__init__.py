"""LangChain integration for selfextend-llm: local RoPE models with an extended context window."""

from langchain_selfextend.chat_models import ChatSelfExtend
from langchain_selfextend.llms import SelfExtendLLM

__all__ = ["ChatSelfExtend", "SelfExtendLLM"]
