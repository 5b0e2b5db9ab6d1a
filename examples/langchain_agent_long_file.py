"""A LangChain agent (``create_agent``) on the embedded 135M default whose tool reads a whole long file.

    python examples/langchain_agent_long_file.py report.txt "What is the pass key?"

The embedded model's chat template renders no tools; ChatSelfExtend offers them in the prompted format
(README, "Tool calling on every model"). A 135M model seldom decides by itself to call a tool, so
``first_turn_calls_a_tool`` (agent middleware) sets ``tool_choice="any"`` until a tool has run: that
call is decoded under a grammar (one well-formed call, schema-valid arguments). The tool puts the whole
file, past the model's trained 8k window, into one SelfExtend call, and its answer is the agent's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, wrap_model_call
from langchain.tools import ToolRuntime
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_selfextend import ChatSelfExtend

QUESTION_PROMPT = "Answer the question using the file."


def make_file_tool(path: Path, llm: ChatSelfExtend):
    """The tool reads the one file the user named, and answers the user's own question from all of it.

    It takes the question from the agent's state (``ToolRuntime``) rather than from the model's arguments:
    a 135M model paraphrases questions badly. ``return_direct``: the tool's answer is the agent's answer.
    """

    @tool(return_direct=True)
    def read_whole_file(runtime: ToolRuntime) -> str:
        """Read the user's whole file and answer their question from it."""
        question = next(m.content for m in runtime.state["messages"] if isinstance(m, HumanMessage))
        text = path.read_text(encoding="utf-8", errors="replace")
        budget = llm.profile["max_input_tokens"] - 256
        if llm.get_num_tokens(text) > budget:
            return f"The file is longer than {budget} tokens, the model's window."
        messages = [("system", QUESTION_PROMPT), ("human", f"{text}\n\n{question}")]
        return str(llm.invoke(messages).content)

    return read_whole_file


@wrap_model_call
def first_turn_calls_a_tool(request: ModelRequest, handler):
    """Force a tool call until one has been made; afterwards the model answers freely."""
    called = any(isinstance(m, ToolMessage) for m in request.messages)
    return handler(request if called else request.override(tool_choice="any"))


def build_agent(path: Path, llm: ChatSelfExtend | None = None):
    llm = llm or ChatSelfExtend(max_tokens=64)
    return create_agent(
        llm,
        tools=[make_file_tool(path, llm)],
        system_prompt="You answer questions about the user's file. Use the read_whole_file tool to read it.",
        middleware=[first_turn_calls_a_tool],
    )


def ask(path: Path, question: str, llm: ChatSelfExtend | None = None) -> dict:
    """Run the agent; returns its messages (the tool call, the tool's answer, the final answer)."""
    return build_agent(path, llm).invoke({"messages": [{"role": "user", "content": question}]})


if __name__ == "__main__":
    state = ask(Path(sys.argv[1]), " ".join(sys.argv[2:]) or "Summarise the file.")
    for message in state["messages"]:
        message.pretty_print()
