from llama_index.llms.selfextend.base import SelfExtendLLM

__all__ = ["SelfExtendLLM"]
