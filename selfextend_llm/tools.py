"""Tool calls in model text: the Hermes/Qwen ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` format.

Chat templates that render tools (Qwen2.5, Hermes, many Llama fine-tunes) ask the model to answer
in this format; the server and both integrations parse it here, so a call is found (or reported as
invalid) the same way everywhere.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass
class ToolCall:
    """One call: ``arguments`` parsed to a dict; ``error`` set when the text could not be parsed."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:12]}")
    raw: str = ""
    error: str | None = None


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The text outside ``<tool_call>`` blocks, and the calls inside them (invalid ones with ``error``)."""
    calls = []
    for raw in _TOOL_CALL.findall(text):
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data.get("name"), str):
                raise ValueError("a tool call needs a JSON object with a string 'name'")
            args = data.get("arguments", data.get("parameters", {}))
            if isinstance(args, str):
                args = json.loads(args)
            if not isinstance(args, dict):
                raise ValueError("tool call arguments must be a JSON object")
        except (ValueError, json.JSONDecodeError) as err:
            calls.append(ToolCall(name="", arguments={}, raw=raw, error=str(err)))
            continue
        calls.append(ToolCall(name=data["name"], arguments=args, raw=raw))
    if not calls:
        return text, []
    return _TOOL_CALL.sub("", text).strip(), calls


def must_call_instruction(name: str | None) -> str:
    """The instruction for a forced call: ``tool_choice`` naming a tool, or "required"/"any" (``name`` None)."""
    return f"You must answer by calling {f'the tool {name!r}' if name else 'one of the tools'}."


def openai_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Valid calls in OpenAI's ``message.tool_calls`` shape (arguments as a JSON string)."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
        for c in calls
        if c.error is None
    ]
