"""Tool calling on every chat model: definitions checked, rendered, forced and parsed in one place.

Calls travel in the Hermes/Qwen format, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``:
templates that render tools themselves (Qwen2.5, Hermes, many Llama fine-tunes) ask for it, and for
templates that do not (the embedded SmolLM2, Gemma) :func:`tools_instruction` writes the same contract
into the system instruction (the *prompted* format, documented in the README), earlier calls become
``<tool_call>`` text and tool results ``<tool_response>`` user turns (:func:`as_plain_chat`).  So the
server, LangChain and LlamaIndex find a call (or report it as invalid) the same way on every model.

A forced call (``tool_choice`` "required"/"any" or a tool's name) is not only asked for:
:func:`call_grammar` is a grammar the decoder is held to (``structured.py``), so the answer *is* one
call of an offered tool with arguments valid for its schema, even from a 135M model.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import validation

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_UNCLOSED = re.compile(r"<tool_call>\s*(.*)$", re.S)

#: ``tool_choice`` values that force some call (OpenAI says "required", LangChain "any").
ANY_TOOL = ("required", "any")


@dataclass
class ToolCall:
    """One call: ``arguments`` parsed to a dict; ``error`` set when the text could not be parsed."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:12]}")
    raw: str = ""
    error: str | None = None


# ---------------------------------------------------------------------------------------------- definitions
def check_tools(tools: Any) -> list[dict[str, Any]]:
    """Tool definitions in OpenAI's shape ``{"type": "function", "function": {name, description, parameters}}``.

    Accepts that shape or the bare function object.  Raises ``TypeError``/``ValueError`` saying what to
    change for anything else: no name, a name twice, parameters that are not a JSON schema object.
    """
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TypeError("tools must be a list of tool definitions (dicts in OpenAI's function format)")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise TypeError(f"tools[{i}] must be a dict in OpenAI's function format, got {type(tool).__name__}")
        if tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}] has type {tool.get('type')!r}; only 'function' tools are supported")
        fn = tool.get("function", tool)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}] needs a function with a name")
        name = fn["name"]
        if name in seen:
            raise ValueError(f"tools[{i}]: the name {name!r} is given twice; tool names must be unique")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping) or params.get("type", "object") != "object":
            raise ValueError(
                f"tools[{i}] ({name!r}): parameters must be a JSON schema of type 'object', got {params!r}"
            )
        validation.json_schema(params, f"tools[{i}] ({name!r}) parameters")
        entry: dict[str, Any] = {"name": name, "parameters": dict(params)}
        if fn.get("description"):
            entry["description"] = str(fn["description"])
        out.append({"type": "function", "function": entry})
    return out


def tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    return [(t.get("function") or t)["name"] for t in tools]


def resolve_choice(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any) -> tuple[bool, str | None]:
    """``(offer, must_call)`` for a ``tool_choice`` (OpenAI's, LangChain's or LlamaIndex's spelling).

    ``offer``: whether the tools go into the prompt ("none" offers none).  ``must_call``: None for a
    free answer, ``""`` for a call of any tool, else the one tool's name.  An unknown name or a choice
    without tools raises ``ValueError``.
    """
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if not isinstance(name, str):
            raise ValueError("tool_choice as an object needs function.name, the tool to call")
        tool_choice = name
    elif tool_choice is True:
        tool_choice = "any"
    elif tool_choice is False:
        tool_choice = "none"
    if tool_choice is not None and not isinstance(tool_choice, str):
        raise TypeError(f"tool_choice must be 'auto', 'none', 'required' or a tool's name, got {tool_choice!r}")
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ValueError(f"tool_choice={tool_choice!r} needs tools; send the tools it may call")
        return False, None
    if tool_choice == "none":
        return False, None
    if tool_choice in (None, "auto"):
        return True, None
    if tool_choice in ANY_TOOL:
        return True, ""
    names = tool_names(tools)
    if tool_choice not in names:
        raise ValueError(f"tool_choice names {tool_choice!r}, which is not among the tools ({', '.join(names)})")
    return True, tool_choice


# ---------------------------------------------------------------------------------------------- prompting
def tools_instruction(tools: Sequence[Mapping[str, Any]]) -> str:
    """The prompted format, for chat templates that render no tools (same contract as Hermes/Qwen)."""
    listed = "\n".join(json.dumps(t) for t in tools)
    return (
        "You can call tools (functions). Their definitions, as JSON schemas:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "To call a tool, answer with a JSON object inside <tool_call></tool_call> tags, and nothing else:\n"
        '<tool_call>\n{"name": "<tool name>", "arguments": {<arguments>}}\n</tool_call>\n'
        "The result comes back inside <tool_response></tool_response> tags. "
        "When no tool is needed, answer normally."
    )


def must_call_instruction(name: str | None) -> str:
    """The instruction for a forced call: ``tool_choice`` naming a tool, or "required"/"any" (``name`` None)."""
    return f"You must answer by calling {f'the tool {name!r}' if name else 'one of the tools'}."


def call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{CLOSE}"


def as_plain_chat(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that knows no tools: earlier calls as ``<tool_call>`` text in the assistant
    turn, tool results as ``<tool_response>`` blocks in a user turn (consecutive results share one)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        entry = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id", "name")}
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = c.get("function", c)
                calls.append(call_text(fn.get("name", ""), fn.get("arguments", {})))
            entry["content"] = "\n".join(p for p in [m.get("content") or "", *calls] if p)
        out.append(entry)
    for entry in out:
        entry.pop("_tool_results", None)
    return out


def has_tool_turns(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


# ---------------------------------------------------------------------------------------------- forcing
def call_grammar(tools: Sequence[Mapping[str, Any]], name: str | None) -> str:
    """A Lark grammar (llguidance) for exactly one call of ``name`` (or of any tool when None), arguments
    valid for that tool's schema."""
    chosen = [t for t in tools if name is None or tool_names([t])[0] == name]
    options = []
    for t in chosen:
        fn = t.get("function") or t
        options.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": fn["name"]},
                    "arguments": closed_schema(fn.get("parameters") or {"type": "object"}),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema["x-guidance"] = {"whitespace_flexible": False}  # compact JSON, as the prompt shows it
    return f'start: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: %json {json.dumps(schema)}\n'


def closed_schema(schema: Any) -> Any:
    """Objects with listed properties take no others unless the schema says so: without this a constrained
    model may keep adding keys until ``max_tokens`` cuts the document."""
    if isinstance(schema, Mapping):
        schema = {k: closed_schema(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [closed_schema(v) for v in schema]
    return schema


# ---------------------------------------------------------------------------------------------- parsing
def _one_call(raw: str) -> ToolCall:
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
        return ToolCall(name="", arguments={}, raw=raw, error=str(err))
    return ToolCall(name=data["name"], arguments=args, raw=raw)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The text outside ``<tool_call>`` blocks, and the calls inside them (invalid ones with ``error``).

    A block the answer opened but never closed (cut by ``max_tokens``) is an invalid call, not content.
    """
    calls = [_one_call(raw) for raw in _TOOL_CALL.findall(text)]
    rest = _TOOL_CALL.sub("", text)
    unclosed = _UNCLOSED.search(rest)
    if unclosed:
        body = unclosed.group(1).strip()
        for cut in range(len(CLOSE) - 1, 0, -1):  # max_tokens may end inside the closing tag itself
            if body.endswith(CLOSE[:cut]):
                body = body[:-cut].rstrip()
                break
        call = _one_call(body)
        if call.error is None:  # the JSON is whole, only the closing tag is missing: keep the call
            calls.append(call)
        else:
            calls.append(ToolCall(name="", arguments={}, raw=unclosed.group(1), error=f"unclosed call: {call.error}"))
        rest = rest[: unclosed.start()]
    if not calls:
        return text, []
    return rest.strip(), calls


def keep_unparsed(content: str, calls: list[ToolCall]) -> str:
    """``content`` with the text of every unparseable call put back: a broken call is shown, never lost
    (for clients whose message has content and valid calls only: the server, LlamaIndex)."""
    broken = [f"{OPEN}{c.raw}{CLOSE}" for c in calls if c.error is not None]
    return "\n".join([content, *broken]).strip()


def openai_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Valid calls in OpenAI's ``message.tool_calls`` shape (arguments as a JSON string)."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
        for c in calls
        if c.error is None
    ]
