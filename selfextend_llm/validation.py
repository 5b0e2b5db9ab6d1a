"""Checks at the boundary of every public entry, so bad input fails before any work starts.

Each check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong value)
with a message that names the argument, the value given and what is allowed.  Nothing deeper in
the library should ever meet a malformed argument: a ``RuntimeError`` from a tensor reshape or a
jinja2 error from a chat template is a bug in these checks, and the property tests look for one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: Roles a chat message may have (OpenAI's, plus "developer", its new name for "system").
ROLES = ("system", "developer", "user", "assistant", "tool")
#: Stop strings a call may have, and characters each (every stop is searched for at every step of every
#: row of a batch: ten thousand of them slowed every request beside them).  OpenAI takes 4.
MAX_STOPS = 64
MAX_STOP_CHARS = 512
#: No tokenizer here averages more characters a token (BPE merges top out near 16 for runs of one
#: character): a text longer than ``window * MAX_CHARS_PER_TOKEN`` cannot fit, and is refused untokenized.
MAX_CHARS_PER_TOKEN = 32


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An ``int`` (not a bool) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {_show(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def optional_integer(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
    return None if value is None else integer(name, value, minimum=minimum, maximum=maximum)


def number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> float:
    """A finite real number (int or float, not a bool) within the bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {_show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive_minimum else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return float(value)


def log_strength(value: Any, group_size: int | None) -> float | None:
    """``log_scale`` beside a fixed ``group_size``: True/False or a strength >= 0 (None: not fixed).

    A strength belongs to a grouping: without ``group_size`` each call takes its length's setting from the
    model's table, strength included, so a strength alone is refused rather than silently dropped."""
    if value is None:
        return None
    if group_size is None:
        raise ValueError(
            f"log_scale={_show(value)} fixes the strength of log-scaled queries of a grouping you fix: pass group_size "
            "(and neighbor_window) too, or leave log_scale out to take the tuned table's setting for each length"
        )
    return float(value) if isinstance(value, bool) else number("log_scale", value, minimum=0)


def stops(value: Any) -> list[str]:
    """``stop``: None, a string or a list of strings; empty strings are dropped (they would stop at once)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"stop must be a string or a list of strings, got {type(value).__name__} {_show(value)}")
    if len(value) > MAX_STOPS:
        raise ValueError(f"stop has {len(value)} strings; at most {MAX_STOPS} are taken: keep the ones that matter")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"stop strings must be str, got {type(item).__name__} {_show(item)} in stop")
        if len(item) > MAX_STOP_CHARS:
            raise ValueError(f"a stop string has {len(item)} characters; at most {MAX_STOP_CHARS} are taken")
        _unicode("stop", item)
    return [s for s in value if s]


def _unicode(name: str, text: str) -> None:
    """Text must be encodable (no lone surrogates, which JSON escapes can carry but no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{name} is not valid Unicode: {err.reason} at index {err.start}; send UTF-8 text") from None


def _message(i: int, message: Any) -> None:
    if not isinstance(message, Mapping):
        raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"messages[{i}]['role'] must be one of {', '.join(ROLES)}; got {_show(role)}")
    if "content" not in message:
        raise ValueError(f"messages[{i}] has no 'content'; give it a string (empty if it has only tool calls)")
    content = message["content"]
    if content is None and role == "assistant" and message.get("tool_calls"):
        return
    if isinstance(content, str):
        _unicode(f"messages[{i}]['content']", content)
        return
    if isinstance(content, list) and all(
        isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        for part in content:
            _unicode(f"messages[{i}]['content']", part["text"])
        return
    raise TypeError(
        f"messages[{i}]['content'] must be a string or a list of {{'type': 'text', 'text': ...}} parts, got "
        f"{type(content).__name__} {_show(content)}"
    )


def prompt(value: Any) -> None:
    """A prompt is non-empty text, or a non-empty list of well-formed chat messages."""
    if isinstance(value, str):
        if not value:
            raise ValueError("prompt is empty; give some text or at least one message")
        _unicode("prompt", value)
        return
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(
            f"prompt must be a string or a list of {{'role': ..., 'content': ...}} messages, got "
            f"{type(value).__name__} {_show(value)}"
        )
    if not value:
        raise ValueError("prompt has no messages; give at least one")
    for i, message in enumerate(value):
        _message(i, message)


def text_parts(content: Any) -> str:
    """A message's content as one string (text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def sampling_extras(*, top_k: Any = None, min_p: Any = None, repetition_penalty: Any = None) -> None:
    """The sampling dials beyond temperature, top_p and seed (:meth:`.engine.sampling.Sampling.checked`)."""
    optional_integer("top_k", top_k, minimum=0)  # 0: every token (vLLM's -1 is refused: say 0 or None)
    if min_p is not None:
        number("min_p", min_p, minimum=0.0, maximum=1.0)
    if repetition_penalty is not None:
        number("repetition_penalty", repetition_penalty, minimum=0.0, exclusive_minimum=True)


#: Limits on a JSON schema for constrained decoding (``response_format``, tool parameters).  Nesting past
#: ~1000 levels (through ``$ref``) overflows llguidance's stack and kills the process; grammar work grows
#: with the schema's size (10k properties: 17 s before the first token).  OpenAI's structured outputs
#: take 10 levels and 5000 properties; these leave room for real schemas and keep a grammar under 1 s.
MAX_SCHEMA_DEPTH = 64  # levels of JSON nesting (an object property is two: "properties", then the name)
MAX_SCHEMA_CHARS = 64 * 1024
MAX_SCHEMA_NODES = 100_000  # nodes visited with every $ref expanded where used


def json_schema(schema: Any, what: str = "the JSON schema") -> None:
    """A schema small and shallow enough to compile quickly and safely (see :data:`MAX_SCHEMA_DEPTH`).

    Depth counts nested objects and arrays, following local ``$ref`` pointers (a recursive schema, one
    whose ``$ref`` comes back to itself, counts each pointer once per path)."""
    import json

    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"{what} is not plain JSON ({type(err).__name__}): send a JSON schema object") from None
    if size > MAX_SCHEMA_CHARS:
        raise ValueError(
            f"{what} is {size} characters of JSON; at most {MAX_SCHEMA_CHARS} are taken: simplify it (fewer "
            "properties or enum values)"
        )
    limit, visited = MAX_SCHEMA_DEPTH, [0]

    def resolve(ref: str) -> Any:
        node: Any = schema
        for part in ref[2:].split("/") if ref.startswith("#/") else ():
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, Mapping) else None
        return node if ref.startswith("#") else None

    def depth(node: Any, level: int, refs: frozenset[str]) -> None:
        visited[0] += 1
        if visited[0] > MAX_SCHEMA_NODES:
            raise ValueError(
                f"{what} expands to more than {MAX_SCHEMA_NODES} nodes once its $ref pointers are followed; simplify it"
            )
        if level > limit:
            raise ValueError(f"{what} nests more than {limit} levels deep (counting $ref pointers); flatten it")
        if isinstance(node, Mapping):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref not in refs:
                depth(resolve(ref), level + 1, refs | {ref})
            for key, value in node.items():
                if key not in ("$defs", "definitions"):  # definitions count where they are used
                    depth(value, level + 1, refs)
        elif isinstance(node, list):
            for value in node:
                depth(value, level, refs)

    depth(schema, 0, frozenset())


def missing_extra(package: str, extra: str) -> ImportError:
    """The error for an optional dependency that is not installed, naming the install that fixes it."""
    return ImportError(f"{package} is not installed; run: pip install 'selfextend-llm[{extra}]'")
