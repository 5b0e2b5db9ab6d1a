"""JSON valid by construction: the constraint on every generation path, and clear errors for bad schemas."""

from __future__ import annotations

import json

import pytest

from selfextend_llm.engine.scheduler import ContinuousBatcher
from selfextend_llm.structured import schema_of

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2},
    },
    "required": ["name", "age", "colour", "tags"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person called Ann."}]


def _check_person(text: str) -> None:
    data = json.loads(text)
    assert list(data) == ["name", "age", "colour", "tags"]  # the schema's order
    assert (
        isinstance(data["name"], str)
        and isinstance(data["age"], int)
        and data["colour"] in PERSON["properties"]["colour"]["enum"]
    )
    assert isinstance(data["tags"], list) and len(data["tags"]) <= 2


def test_schema_of_reads_openai_shapes_and_refuses_others():
    assert schema_of(None) is None and schema_of({"type": "text"}) is None
    assert schema_of({"type": "json_object"}) is True
    assert schema_of({"type": "json_schema", "json_schema": {"schema": PERSON}}) == PERSON
    assert schema_of(PERSON) == PERSON  # a bare schema, as LangChain's with_structured_output passes it
    with pytest.raises(ValueError, match="json_schema.schema"):
        schema_of({"type": "json_schema", "json_schema": {}})
    with pytest.raises(ValueError, match="not supported"):
        schema_of({"type": "yaml"})
    with pytest.raises(TypeError, match="must be a dict"):
        schema_of("json")


def test_complete_stream_and_batcher_write_schema_valid_json(default_model):
    fmt = {"type": "json_schema", "json_schema": {"schema": PERSON}}
    for seed in range(3):  # sampled, so the constraint (not luck) makes it valid
        _check_person(
            default_model.complete(ASK, max_new_tokens=120, response_format=fmt, temperature=0.8, seed=seed).text
        )
    _check_person("".join(default_model.stream(ASK, max_new_tokens=120, response_format=fmt)))
    batcher = ContinuousBatcher(default_model)
    try:
        handles = [
            batcher.submit(ASK, max_new_tokens=120, response_format=fmt, temperature=0.8, seed=s) for s in range(3)
        ]
        any_json = batcher.submit(ASK, max_new_tokens=60, response_format={"type": "json_object"})
        for h in handles:
            _check_person(h.result().text)
        free_form = any_json.result()  # an object, though only a length cut can leave it open (as with OpenAI's)
        assert free_form.text.startswith("{")
        assert free_form.finish_reason == "length" or isinstance(json.loads(free_form.text), dict)
    finally:
        batcher.close()


def test_a_schema_that_cannot_compile_fails_before_generation(default_model):
    bad = {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"type": "wat"}}}}}
    with pytest.raises(ValueError, match="cannot be compiled"):
        default_model.complete(ASK, response_format=bad)


def test_instructions_merge_into_the_users_system_message(default_model):
    merged = default_model.with_instruction([{"role": "system", "content": "Be brief."}, *ASK], "Answer in JSON.")
    assert [m["role"] for m in merged] == ["system", "user"]
    assert merged[0]["content"] == "Answer in JSON.\n\nBe brief."
    added = default_model.with_instruction(ASK, "Answer in JSON.")
    assert added[0] == {"role": "system", "content": "Answer in JSON."}


def test_templates_without_a_system_role_get_the_instruction_in_the_first_user_turn(default_model, monkeypatch):
    monkeypatch.setitem(default_model.__dict__, "supports_system_role", False)  # as Gemma 2/3's templates
    merged = default_model.with_instruction([{"role": "system", "content": "Be brief."}, *ASK], "Answer in JSON.")
    assert [m["role"] for m in merged] == ["user"]
    assert merged[0]["content"].startswith("Answer in JSON.\n\nBe brief.\n\nDescribe a person")


NOTES = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "notes": {
            "type": "array",
            "items": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        },  # fmt: skip
    },
    "required": ["title", "notes"],
}


@pytest.mark.parametrize("budget", [12, 20, 40])
def test_a_constrained_answer_closes_validly_within_max_tokens(default_model, budget):
    """Unbounded strings and arrays would run to the cut; near the end of the budget the constraint takes
    the tokens that close the document instead (held-out agent checks failed with JSON cut at 120-160)."""
    fmt = {"type": "json_schema", "json_schema": {"schema": NOTES}}
    ask = [{"role": "user", "content": "Write a long title and many notes about the sea."}]
    for seed in range(2):
        got = default_model.complete(ask, max_new_tokens=budget, response_format=fmt, temperature=1.0, seed=seed)
        data = json.loads(got.text)  # valid, not cut
        assert set(data) == {"title", "notes"} and got.completion_tokens <= budget
    batcher = ContinuousBatcher(default_model)
    try:
        got = batcher.submit(ask, max_new_tokens=budget, response_format=fmt, temperature=1.0, seed=7).result()
    finally:
        batcher.close()
    assert set(json.loads(got.text)) == {"title", "notes"}


def test_a_forced_tool_call_closes_validly_within_max_tokens(default_model):
    tools = [{"type": "function", "function": {"name": "write", "parameters": NOTES}}]
    ask = [{"role": "user", "content": "Write notes about the sea with the tool."}]
    got = default_model.complete(ask, max_new_tokens=30, tools=tools, tool_choice="required", temperature=1.0, seed=3)
    _, calls = default_model.parse_tool_calls(got.text)
    assert len(calls) == 1 and calls[0].error is None and calls[0].name == "write", got.text


def test_a_matcher_in_error_raises_instead_of_ending_the_document(default_model):
    from selfextend_llm.structured import UnsatisfiableError

    constraint = default_model.constraint({"type": "json_object"})
    bad = default_model.tokenizer.encode("hello", add_special_tokens=False)[0]  # an object cannot start so
    constraint.accept(bad)
    import torch

    with pytest.raises(UnsatisfiableError, match="no valid continuation"):
        constraint.mask_(torch.zeros(constraint.vocab_size))
