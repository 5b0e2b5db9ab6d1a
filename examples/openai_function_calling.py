"""Function calling against `selfextend-llm serve` with the official openai client: the agent loop
every OpenAI SDK user writes, a local whole-file tool, the embedded 135M default model.

selfextend-llm serve --port 8000 &
OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=unused python examples/openai_function_calling.py report.txt

The first turn forces the call (``tool_choice`` naming the tool): the server decodes it under a grammar,
so even a small model answers with one well-formed call whose arguments match the schema. The tool's
result goes back as a ``tool`` message and the model answers from the whole file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from openai import OpenAI

MODEL = "SmolLM2-135M-Instruct"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a whole text file and return its contents.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string", "description": "The file to read."}},
                "required": ["path"],
            },
        },
    }
]


def read_file(path: str) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def ask_about_file(client: OpenAI, path: str, question: str, model: str = MODEL) -> tuple[dict, str]:
    """One tool round trip: (the call the model made, its final answer)."""
    messages = [{"role": "user", "content": f"The file is {path}. {question}"}]
    first = client.chat.completions.create(
        model=model,
        messages=messages,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "read_file"}},
        max_tokens=64,
        temperature=0,
    )
    call = first.choices[0].message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    # a small model may write the path it was told in its own way; the tool reads the file it was given
    result = read_file(path)
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    final = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=48, temperature=0)
    return {"name": call.function.name, "arguments": arguments}, final.choices[0].message.content or ""


if __name__ == "__main__":
    made, answer = ask_about_file(OpenAI(), sys.argv[1], " ".join(sys.argv[2:]) or "What does it say?")
    print("tool call:", made)
    print("answer:", answer)
