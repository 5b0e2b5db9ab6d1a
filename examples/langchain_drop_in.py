"""Drop-in replacement: an LCEL pipeline written for a hosted chat model, switched by one line.

The pipeline below is unchanged from its hosted version; only `make_llm` differs:

    # before:  from langchain_openai import ChatOpenAI; return ChatOpenAI(model="gpt-4o-mini")
    # after:   return ChatSelfExtend()
"""

from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_selfextend import ChatSelfExtend


def make_llm():
    return ChatSelfExtend(max_tokens=48)  # the one changed line


def build_pipeline(llm):
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a concise assistant."), ("human", "Translate to French: {text}")]
    )
    return prompt | llm | StrOutputParser()


if __name__ == "__main__":
    print(build_pipeline(make_llm()).invoke({"text": "Good morning, my friend."}))
