"""Whole-document question answering with LlamaIndex and no retrieval.

A SummaryIndex hands every node to the LLM; with `response_mode="compact"` LlamaIndex packs
nodes up to `metadata.context_window`, so with SelfExtend the whole document is one call.
"""

from __future__ import annotations

from llama_index.core import Document, Settings, SummaryIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.llms.selfextend import SelfExtendLLM

from selfextend_llm.tasks.documents import make_fact_document


def build_query_engine(llm: SelfExtendLLM, text: str, chunk_size: int = 2048):
    Settings.llm = llm
    Settings.tokenizer = llm.tokenizer
    nodes = SentenceSplitter(chunk_size=chunk_size, chunk_overlap=0, tokenizer=llm.tokenizer).get_nodes_from_documents(
        [Document(text=text)]
    )
    return SummaryIndex(nodes).as_query_engine(response_mode="compact", llm=llm)


def main(n_tokens: int = 12_000) -> str:
    llm = SelfExtendLLM(max_new_tokens=16)
    text, question, answer = make_fact_document(n_tokens, lambda s: len(llm.tokenizer(s)), seed=11)
    reply = str(build_query_engine(llm, text).query(question))
    print(f"window {llm.metadata.context_window}; answer {reply!r} (expected {answer})")
    return reply


if __name__ == "__main__":
    main()
