"""Bad input gets a clear, typed error before any work starts: property tests over the Python API,
a schema fuzzer over the server, and the cases a new user actually tried."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode
from starlette.testclient import TestClient

import selfextend_llm
from selfextend_llm import validation
from selfextend_llm.config import SelfExtendConfig
from selfextend_llm.server import create_app
from tests.helpers import tiny_served_model

#: What a caller may see from bad input; anything else (RuntimeError, KeyError, jinja2, ...) is a bug.
DOCUMENTED = (ValueError, TypeError)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

anything = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.binary(max_size=8), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(), st.text()),
)  # fmt: skip
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system", "wizard", "", "tool"])},
            optional={"content": st.one_of(st.text(max_size=40), anything)},
        ),
        anything,
    ),
    max_size=3,
)
prompts = st.one_of(
    st.text(max_size=300), st.sampled_from(["", " ", "\x00", "\n\t", "\u202e", "a" * 4000]), messages, anything
)


def _call(fn):
    try:
        fn()
    except DOCUMENTED:
        pass


@FAST
@given(prompt=prompts, max_new_tokens=st.one_of(st.integers(-3, 2), anything), temperature=anything)
def test_generate_succeeds_or_raises_a_documented_error(default_model, prompt, max_new_tokens, temperature):
    _call(lambda: default_model.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature))


@FAST
@given(prompt=prompts, stop=st.one_of(anything, st.lists(st.one_of(st.text(max_size=5), anything), max_size=3)))
def test_stream_and_count_tokens_succeed_or_raise_a_documented_error(default_model, prompt, stop):
    _call(lambda: list(default_model.stream(prompt, max_new_tokens=2, stop=stop)))
    _call(lambda: default_model.count_tokens(prompt))


@FAST
@given(top_p=anything, seed=st.one_of(anything, st.integers(-(2**70), 2**70)))
def test_sampling_numbers_are_checked(default_model, top_p, seed):
    _call(lambda: default_model.generate("Hi", max_new_tokens=1, temperature=0.7, top_p=top_p, seed=seed))


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda m: m.generate("", max_new_tokens=4), ValueError, "prompt is empty"),
        (lambda m: m.generate("hi", max_new_tokens=-1), ValueError, "max_new_tokens must be >= 1, got -1"),
        (lambda m: m.generate("hi", max_new_tokens=0), ValueError, "max_new_tokens must be >= 1, got 0"),
        (lambda m: m.generate("hi", max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
        (lambda m: m.generate("hi", stop=5), TypeError, "stop must be a string or a list of strings"),
        (lambda m: m.generate("hi", stop=["ok", 3]), TypeError, "stop strings must be str"),
        (lambda m: m.generate([{"role": "user"}]), ValueError, "messages[0] has no 'content'"),
        (lambda m: m.generate([{"role": "wizard", "content": "hi"}]), ValueError, "['role'] must be one of"),
        (lambda m: m.generate([]), ValueError, "no messages"),
        (lambda m: m.generate("hi", temperature=math.nan), ValueError, "temperature must be a finite number"),
        (lambda m: m.generate("hi", temperature=-1), ValueError, "temperature must be >= 0"),
        (lambda m: m.generate("hi", top_p=0), ValueError, "top_p must be > 0"),
        (lambda m: m.generate("hi", seed=-1), ValueError, "seed must be >= 0"),
        (lambda m: m.complete_batch("hi"), TypeError, "prompts must be a non-empty list"),
    ],
)
def test_what_a_new_user_tried_gets_a_clear_error(default_model, call, error, words):
    settings = selfextend_llm.hf.apply.settings_of(default_model.model)
    before = settings.calls
    with pytest.raises(error, match=re.escape(words)):
        call(default_model)
    assert settings.calls == before  # refused before any attention ran


def test_explicit_settings_are_kept_or_refused():
    with pytest.raises(ValueError, match=r"neighbor_window=100000 must be smaller than .* \(8192 tokens\)"):
        selfextend_llm.load(neighbor_window=100000)
    with pytest.raises(ValueError, match=r"would need group size 2570 .* largest group size accepted is 64"):
        selfextend_llm.load(target_context=10_000_000)
    with pytest.raises(TypeError, match="target_context must be an int"):
        selfextend_llm.load(target_context="32k")
    with pytest.raises(TypeError, match="fast_generation must be True, False or None"):
        selfextend_llm.load(fast_generation="yes")
    # a log strength goes with a fixed grouping, and is a number >= 0 (refused before the model loads)
    with pytest.raises(ValueError, match=r"log_scale=0.5 fixes the strength .* pass group_size"):
        selfextend_llm.load(log_scale=0.5)
    with pytest.raises(ValueError, match="log_scale must be >= 0, got -1"):
        selfextend_llm.load(group_size=4, log_scale=-1)
    with pytest.raises(TypeError, match="log_scale must be a number, got str"):
        selfextend_llm.load(group_size=4, log_scale="half")
    # a window the model can take is kept exactly, at any target
    lm = selfextend_llm.load(neighbor_window=3000, target_context=20_000)
    assert lm.config.neighbor_window == 3000
    # a fixed grouping with a strength is what every call runs, and what describe() reports
    fixed = selfextend_llm.load(group_size=4, neighbor_window=1024, log_scale=0.5)
    assert fixed.config == SelfExtendConfig(4, 1024, log_scale=0.5) and not fixed.adaptive
    assert fixed.plan.config_for(20_000) == fixed.config
    assert fixed.describe()["log_scale"] == 0.5
    assert selfextend_llm.load(group_size=4, neighbor_window=1024, log_scale=True).config.log_scale == 1.0
    assert SelfExtendConfig.for_target(8192, 60_000, neighbor_window=5000).neighbor_window == 5000


def test_framework_classes_refuse_a_window_the_model_cannot_take():
    from langchain_selfextend import ChatSelfExtend
    from llama_index.llms.selfextend import SelfExtendLLM

    with pytest.raises(ValueError, match="neighbor_window=100000"):
        ChatSelfExtend(neighbor_window=100000)
    with pytest.raises(ValueError, match="neighbor_window=100000"):
        SelfExtendLLM(neighbor_window=100000)
    # a log strength reaches load() from both, and is refused there without a fixed grouping
    with pytest.raises(ValueError, match="log_scale=0.5 fixes the strength"):
        ChatSelfExtend(log_scale=0.5)
    with pytest.raises(ValueError, match="log_scale=0.5 fixes the strength"):
        SelfExtendLLM(log_scale=0.5)


def test_apply_refuses_unreachable_targets():
    from tests.helpers import tiny_model

    model = tiny_model("llama")  # trained on 64 tokens
    with pytest.raises(ValueError, match="largest group size accepted is 64"):
        selfextend_llm.apply(model, target_context=1_000_000)
    with pytest.raises(TypeError, match="target_context must be an int"):
        selfextend_llm.apply(model, target_context=1.5)


def test_cli_errors_are_one_line_and_name_the_fix(tmp_path):
    run = [sys.executable, "-m", "selfextend_llm.cli"]
    out = subprocess.run([*run, "info", "--neighbor-window", "100000"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: neighbor_window=100000 must be smaller")
    assert "Traceback" not in out.stderr
    out = subprocess.run([*run, "info", "--log-scale", "0.5"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: log_scale=0.5 fixes the strength")
    # the server extra missing: hide fastapi from the child process
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['fastapi'] = None\n")
    env = {"PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([*run, "serve"], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert "pip install 'selfextend-llm[server]'" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------ the server, fuzzed from its own schema


@pytest.fixture(scope="module")
def tiny_server_model(default_model):
    """A one-layer random model with the real tokenizer: the server's whole path, at fuzzing speed."""
    return tiny_served_model(default_model.tokenizer, layers=1, hidden=32, context_window=160)


@pytest.fixture(scope="module")
def app(tiny_server_model):
    return create_app(tiny_server_model)


def _declared_fields() -> frozenset[str]:
    from selfextend_llm.server import protocol

    models = (protocol.ChatRequest, protocol.CompletionRequest, protocol.TokenizeRequest, protocol.DetokenizeRequest)
    return frozenset(name for m in models for name in m.model_fields)


def _served_model(case):
    """Most fuzzed bodies name the served model, so that they reach generation rather than a 404, and keep
    only declared fields: the schema allows extra ones (to refuse them by name), and a body that hypothesis
    filled with random keys is always a 400, so a run of such bodies never reached generation."""
    if isinstance(case.body, dict):
        declared = _declared_fields()
        for key in [k for k in case.body if k not in declared]:
            del case.body[key]
    if isinstance(case.body, dict) and "model" in case.body and case.body["model"] != "other":
        case.body["model"] = "tiny"
    if case.path_parameters and "model_name" in case.path_parameters:
        case.path_parameters["model_name"] = "tiny"
    return case


def _fuzz(operation, mode: GenerationMode) -> list[int]:
    """Send fuzzed requests for one operation; return the statuses seen."""
    statuses: list[int] = []

    # derandomized: the same bodies every run (a run of 25 random ones sometimes had no valid /tokenize body)
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=operation.as_strategy(generation_mode=mode).map(_served_model))
    def fuzz(case):
        response = case.call(timeout=120)
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.body, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error["message"], str) and error["message"]
            assert error["type"] == "invalid_request_error"

    fuzz()
    return statuses


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_5xx_and_errors_have_openai_shape(app, mode):
    """Every operation of the server's own OpenAPI schema, fuzzed with bodies that fit the schema
    (they must succeed or be refused in OpenAI's shape) and bodies that break it (refused)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.method != "post":
            continue  # nothing to break: no body, and any string is a valid model name
        statuses = _fuzz(operation, mode)
        if operation.method == "post" and mode == GenerationMode.POSITIVE:
            assert 200 in statuses, f"no fuzzed {operation.path} request reached generation: {statuses}"


def test_server_still_answers_after_bad_requests(app):
    client = TestClient(app)
    bad = [
        {"model": "tiny", "messages": []},
        {"model": "tiny", "messages": [{"role": "user", "content": ""}], "temperature": 1e308},
        {"model": "tiny", "prompt": "", "max_tokens": 3},
        {"model": "tiny", "prompt": "hi", "seed": -5, "stream": True},
        {"model": "tiny", "prompt": "hi", "stop": [1, 2]},
    ]
    for body in bad:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        reply = client.post(path, content=json.dumps(body))
        assert reply.status_code == 400, (body, reply.text)
        assert reply.json()["error"]["type"] == "invalid_request_error"
    reply = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    garbled = client.post("/v1/completions", content=b"{}", headers={"content-length": "x"})
    assert garbled.status_code in (400, 413)


def test_missing_extra_message_names_the_install():
    err = validation.missing_extra("fastapi", "server")
    assert isinstance(err, ImportError)
    assert str(err) == "fastapi is not installed; run: pip install 'selfextend-llm[server]'"


def test_token_counters_take_any_text(default_model):
    """Splitters and counters (LlamaIndex's Settings.tokenizer, LangChain's get_token_ids) count
    empty strings as zero tokens; only a prompt must have text."""
    from langchain_selfextend import ChatSelfExtend
    from llama_index.llms.selfextend import SelfExtendLLM

    assert default_model.tokenize("") == []
    assert SelfExtendLLM(selfextend_model=default_model).tokenizer("") == []
    assert ChatSelfExtend(client=default_model).get_num_tokens("") == 0
    assert default_model.tokenize("Hello world") == default_model.encode("Hello world")
    with pytest.raises(TypeError, match="text must be a str"):
        default_model.tokenize(None)
