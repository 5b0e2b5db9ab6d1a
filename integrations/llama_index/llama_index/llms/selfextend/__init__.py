from llama_index.llms.selfextend.base import SelfExtendLLM, SelfExtendMetadata

__all__ = ["SelfExtendLLM", "SelfExtendMetadata"]
