"""Tool calling on every model: definitions checked, the prompted format, forced calls under a grammar,
parsing (whole, broken, cut), on the real embedded default (whose template renders no tools)."""

from __future__ import annotations

import json

import pytest

from selfextend_llm import tools

READ_FILE = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a whole text file.",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "max_lines": {"type": "integer"}},
            "required": ["path", "max_lines"],
        },
    },
}
WEATHER = {  # the bare function shape is accepted too
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
}


# ------------------------------------------------------------------------------------------ pure functions
def test_check_tools_normalises_and_refuses_what_is_not_a_tool():
    checked = tools.check_tools([READ_FILE, WEATHER])
    assert [t["type"] for t in checked] == ["function", "function"]
    assert tools.tool_names(checked) == ["read_file", "get_weather"]
    assert checked[1]["function"]["parameters"]["required"] == ["city", "days"]
    with pytest.raises(TypeError, match="list of tool definitions"):
        tools.check_tools(READ_FILE)
    with pytest.raises(ValueError, match="needs a function with a name"):
        tools.check_tools([{"type": "function", "function": {"parameters": {}}}])
    with pytest.raises(ValueError, match="JSON schema of type 'object'"):
        tools.check_tools([{"name": "f", "parameters": {"type": "string"}}])
    with pytest.raises(ValueError, match="given twice"):
        tools.check_tools([WEATHER, WEATHER])
    with pytest.raises(ValueError, match="only 'function' tools"):
        tools.check_tools([{"type": "code_interpreter"}])


def test_resolve_choice_speaks_openai_langchain_and_llamaindex():
    checked = tools.check_tools([READ_FILE, WEATHER])
    assert tools.resolve_choice(checked, None) == (True, None)
    assert tools.resolve_choice(checked, "auto") == (True, None)
    assert tools.resolve_choice(checked, "none") == (False, None)
    assert tools.resolve_choice(checked, "required") == tools.resolve_choice(checked, "any") == (True, "")
    assert tools.resolve_choice(checked, True) == (True, "")
    assert tools.resolve_choice(checked, {"type": "function", "function": {"name": "get_weather"}}) == (
        True,
        "get_weather",
    )
    with pytest.raises(ValueError, match="not among the tools"):
        tools.resolve_choice(checked, "delete_everything")
    with pytest.raises(ValueError, match="needs tools"):
        tools.resolve_choice(None, "required")
    with pytest.raises(TypeError, match="tool_choice must be"):
        tools.resolve_choice(checked, 3)


def test_plain_chat_writes_history_in_the_prompted_format():
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        {"role": "tool", "tool_call_id": "c2", "content": "sun"},
    ]  # fmt: skip
    plain = tools.as_plain_chat(messages)
    assert [m["role"] for m in plain] == ["user", "assistant", "user"]
    assert plain[1]["content"].count("<tool_call>") == 2 and '"arguments": {"city": "Oslo"}' in plain[1]["content"]
    assert plain[2]["content"] == "<tool_response>\nrain\n</tool_response>\n<tool_response>\nsun\n</tool_response>"
    assert all("tool_calls" not in m and "tool_call_id" not in m for m in plain)
    # what the model then writes parses back to the same calls
    _, calls = tools.parse_tool_calls(plain[1]["content"])
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_weather", {"city": "Rome"}),
    ]


@pytest.mark.parametrize(
    ("text", "content", "valid", "invalid"),
    [
        ('Sure. <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', "Sure.", [("f", {"a": 1})], 0),
        ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}</tool_call>', "", [("f", {"a": 2})], 0),
        ('<tool_call>{"name": "f", "arguments": {"a": </tool_call>', "", [], 1),
        ('<tool_call>{"name": 3}</tool_call>', "", [], 1),
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_', "", [("f", {"a": 1})], 0),  # cut in the tag
        ('Hmm <tool_call>\n{"name": "f", "argum', "Hmm", [], 1),  # cut inside the JSON: invalid, not content
        ("no calls at all", "no calls at all", [], 0),
    ],
)
def test_parse_tool_calls_whole_broken_and_cut(text, content, valid, invalid):
    rest, calls = tools.parse_tool_calls(text)
    assert rest == content
    assert [(c.name, c.arguments) for c in calls if c.error is None] == valid
    assert sum(c.error is not None for c in calls) == invalid
    assert all(c.raw for c in calls if c.error is not None)  # the text of a broken call is kept


def test_call_grammar_names_only_the_chosen_tool_and_closes_its_arguments():
    checked = tools.check_tools([READ_FILE, WEATHER])
    one = tools.call_grammar(checked, "get_weather")
    assert "get_weather" in one and "read_file" not in one and '"additionalProperties": false' in one
    both = tools.call_grammar(checked, None)
    assert "anyOf" in both and "read_file" in both and "get_weather" in both


# ------------------------------------------------------------------------------------------ real default model
def test_prompted_format_renders_tools_for_a_template_without_them(default_model):
    assert default_model.tool_format == "prompted" and default_model.supports_tools
    messages = [{"role": "user", "content": "What is in a.txt?"}]
    prompt = default_model.tokenizer.decode(default_model.encode(messages, tools=[READ_FILE]))
    assert "<tools>" in prompt and '"name": "read_file"' in prompt and "<tool_call>" in prompt
    assert "<tools>" not in default_model.tokenizer.decode(default_model.encode(messages))
    # the user's own system message keeps its text, with the tools merged into it (one system turn)
    own = [{"role": "system", "content": "Be terse."}, *messages]
    text = default_model.tokenizer.decode(default_model.encode(own, tools=[READ_FILE]))
    assert text.count("<|im_start|>system") == 1 and "Be terse." in text and "<tools>" in text


def _valid_call(text: str, tool: dict) -> dict:
    content, calls = tools.parse_tool_calls(text)
    assert content == "" and len(calls) == 1 and calls[0].error is None, text
    fn = tool.get("function", tool)
    assert calls[0].name == fn["name"]
    props = fn["parameters"]["properties"]
    assert set(calls[0].arguments) == set(fn["parameters"]["required"]) <= set(props)
    kinds = {"string": str, "integer": int}
    for key, value in calls[0].arguments.items():
        assert isinstance(value, kinds[props[key]["type"]]) and value in props[key].get("enum", [value])
    return calls[0].arguments


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_forced_calls_are_valid_by_construction_on_every_path(default_model, temperature):
    """The 135M default, asked in prose, writes one valid call of the named tool: whole, streamed and batched."""
    messages = [{"role": "user", "content": "Tell me about the weather in Oslo for 3 days."}]
    kw = {"max_new_tokens": 60, "temperature": temperature, "seed": 1, "tools": [READ_FILE, WEATHER]}
    done = default_model.complete(messages, tool_choice="get_weather", **kw)
    _valid_call(done.text, WEATHER)
    streamed = "".join(default_model.stream(messages, tool_choice="get_weather", **kw))
    _valid_call(streamed, WEATHER)
    handle = default_model.batcher().submit(messages, tool_choice={"function": {"name": "read_file"}}, **kw)
    _valid_call("".join(c.text for c in handle), READ_FILE)
    anyone = default_model.complete(messages, tool_choice="required", **kw)
    _, (call,) = tools.parse_tool_calls(anyone.text)
    _valid_call(anyone.text, READ_FILE if call.name == "read_file" else WEATHER)


def test_tool_choice_none_offers_nothing_and_bad_tool_input_fails_before_work(default_model):
    messages = [{"role": "user", "content": "hi"}]
    prompt, offered, must = default_model.prepare_tools(messages, [READ_FILE], "none")
    assert offered is None and must is None and prompt == messages
    with pytest.raises(ValueError, match="not among the tools"):
        default_model.complete(messages, tools=[READ_FILE], tool_choice="get_weather")
    with pytest.raises(ValueError, match="chat prompt"):
        default_model.complete("plain text", tools=[READ_FILE], tool_choice="required")
    with pytest.raises(ValueError, match="cannot both"):
        default_model.complete(
            messages, tools=[READ_FILE], tool_choice="required", response_format={"type": "json_object"}
        )
    with pytest.raises(ValueError, match="JSON schema of type 'object'"):
        default_model.batcher().submit(messages, tools=[{"name": "f", "parameters": []}])


def test_a_tool_round_trip_renders_history_the_model_can_read(default_model):
    """Call, result, answer: the second turn sees its own call and the result in the prompted format."""
    messages = [{"role": "user", "content": "What is the weather in Rome for 2 days?"}]
    first = default_model.complete(messages, tools=[WEATHER], tool_choice="get_weather", max_new_tokens=40)
    _, (call,) = tools.parse_tool_calls(first.text)
    fn = {"name": call.name, "arguments": json.dumps(call.arguments)}
    history = [
        *messages,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function", "function": fn}
        ]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C."},
    ]  # fmt: skip
    prompt = default_model.tokenizer.decode(default_model.encode(history, tools=[WEATHER]))
    assert "<tool_response>\nSunny, 24 C.\n</tool_response>" in prompt and '"name": "get_weather"' in prompt
    assert default_model.complete(history, tools=[WEATHER], max_new_tokens=24).completion_tokens > 0


def test_a_tokenizer_response_parser_is_asked_first(default_model, monkeypatch):
    """Templates with their own call format: transformers' parse_response (the model's schema) wins."""
    tok = default_model.tokenizer
    monkeypatch.setattr(tok, "response_template", {"x": "schema"}, raising=False)
    answer = {"content": "Looking.", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
              "arguments": {"city": "Oslo", "days": 2}}}, {"function": {"name": "", "arguments": "{}"}}]}  # fmt: skip
    monkeypatch.setattr(tok, "parse_response", lambda text, prefix=None: answer, raising=False)
    content, calls = default_model.parse_tool_calls("[TOOL_CALLS] get_weather ...")
    assert (
        content == "Looking." and calls[0].name == "get_weather" and calls[0].arguments == {"city": "Oslo", "days": 2}
    )
    assert calls[1].error is not None  # a call without a name is reported, not dropped
    # nothing found by the model's parser: <tool_call> blocks as usual
    monkeypatch.setattr(tok, "parse_response", lambda text, prefix=None: {"content": text}, raising=False)
    _, (call,) = default_model.parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    assert call.name == "f"


def test_keep_unparsed_puts_broken_calls_back_into_the_content():
    content, calls = tools.parse_tool_calls(
        'Hi <tool_call>{"name": "f", "arguments": {}}</tool_call> <tool_call>{x</tool_call>'
    )
    assert tools.keep_unparsed(content, calls) == "Hi\n<tool_call>{x</tool_call>"
    assert tools.keep_unparsed("plain", []) == "plain"
