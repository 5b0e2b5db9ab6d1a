"""An agent tool that reads a long file whole and answers a question about it.

Any LangChain agent can call `read_long_file`; the entire file goes to ChatSelfExtend in one call.
"""

from __future__ import annotations

from pathlib import Path

from langchain_core.tools import tool
from langchain_selfextend import ChatSelfExtend

_LLM: ChatSelfExtend | None = None


def _llm() -> ChatSelfExtend:
    global _LLM
    if _LLM is None:
        _LLM = ChatSelfExtend(max_tokens=64)
    return _LLM


@tool
def read_long_file(path: str, question: str) -> str:
    """Answer a question about a text file by reading the whole file at once (up to the model's extended window)."""
    llm = _llm()
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    budget = llm.profile["max_input_tokens"] - 200
    if llm.get_num_tokens(text) > budget:
        return f"The file is longer than {budget} tokens, the model's window; ask about a smaller part of it."
    messages = [
        ("system", "Answer the question using the file."),
        ("human", f"File {Path(path).name}:\n{text}\n\n{question}"),
    ]
    return llm.invoke(messages).content


if __name__ == "__main__":
    import sys

    print(read_long_file.invoke({"path": sys.argv[1], "question": " ".join(sys.argv[2:]) or "Summarise the file."}))
