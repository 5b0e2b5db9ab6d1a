"""Whole-document question answering with LangChain: no splitter, no retriever, one model call.

`profile["max_input_tokens"]` of ChatSelfExtend is the extended window, so the whole document
goes into a single prompt.
"""

from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_selfextend import ChatSelfExtend

from selfextend_llm.tasks.documents import make_fact_document

PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer the question using the document."),
        ("human", "{document}\n\n{question}"),
    ]
)


def build_chain(llm: ChatSelfExtend):
    """document + question -> answer, in one call (a 'stuff' chain written in plain LCEL)."""
    return PROMPT | llm | StrOutputParser()


def main(n_tokens: int = 12_000) -> str:
    llm = ChatSelfExtend(max_tokens=16)
    document, question, answer = make_fact_document(n_tokens, llm.get_num_tokens, seed=7)
    print(f"window {llm.profile['max_input_tokens']} tokens; document {llm.get_num_tokens(document)} tokens")
    reply = build_chain(llm).invoke({"document": document, "question": question})
    print(f"answer: {reply!r} (expected {answer})")
    return reply


if __name__ == "__main__":
    main()
