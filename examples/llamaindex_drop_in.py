"""Drop-in replacement: `Settings.llm` switched from a hosted LLM to SelfExtendLLM.

# before:  from llama_index.llms.openai import OpenAI; Settings.llm = OpenAI(model="gpt-4o-mini")
# after:   Settings.llm = SelfExtendLLM()
"""

from __future__ import annotations

from llama_index.core import Document, Settings, SummaryIndex
from llama_index.llms.selfextend import SelfExtendLLM


def configure() -> None:
    Settings.llm = SelfExtendLLM(max_new_tokens=48)  # the one changed line


def existing_pipeline(question: str) -> str:
    """Unchanged application code: it only ever talks to Settings.llm."""
    docs = [Document(text="The museum opens at 9 am and closes at 5 pm. Entry is free on Sundays.")]
    return str(SummaryIndex.from_documents(docs).as_query_engine(response_mode="compact").query(question))


if __name__ == "__main__":
    configure()
    print(existing_pipeline("When does the museum open?"))
