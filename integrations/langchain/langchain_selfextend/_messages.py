"""LangChain messages to chat-template dicts, and tool calls parsed back out of model text."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    convert_to_messages,
)

_ROLES = {HumanMessage: "user", AIMessage: "assistant", SystemMessage: "system", ToolMessage: "tool"}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif isinstance(block, dict) and block.get("type") in ("image", "image_url", "file", "audio"):
            raise ValueError(f"this model reads text only; got a {block['type']!r} content block")
    return "".join(parts)


def to_chat_dicts(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    out = []
    for m in convert_to_messages(messages):
        role = (
            m.role if isinstance(m, ChatMessage) else next((r for cls, r in _ROLES.items() if isinstance(m, cls)), None)
        )
        if role is None:
            raise ValueError(f"unsupported message type {type(m).__name__}")
        entry: dict[str, Any] = {"role": role, "content": _text(m.content)}
        if isinstance(m, AIMessage) and m.tool_calls:
            entry["tool_calls"] = [
                {"type": "function", "id": tc.get("id"), "function": {"name": tc["name"], "arguments": tc["args"]}}
                for tc in m.tool_calls
            ]
        if isinstance(m, ToolMessage):
            entry["tool_call_id"] = m.tool_call_id
        out.append(entry)
    return out
