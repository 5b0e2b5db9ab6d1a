"""The server as a hostile client meets it: nothing takes it down, nothing is silently ignored.

Each case of issue 33 is here: a deep ``$ref`` chain (it crashed llguidance), a chunked body past the limit,
a huge text to tokenize (it froze every client), long stop lists, unknown fields, sampling extensions, hung-up
clients (they were counted as 500s), unsatisfiable schemas, and the prefix cache's ``cached_tokens``.
"""

from __future__ import annotations

import concurrent.futures as futures
import time

import httpx
import openai
import pytest

from selfextend_llm import validation
from selfextend_llm.server import BackgroundServer, create_app

KEY = "hardening-key"
MODEL = "SmolLM2-135M-Instruct"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(default_model):
    with BackgroundServer(create_app(default_model, api_key=KEY, max_body_bytes=4_000_000)) as url:
        yield url


def _post(server: str, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server}{path}", headers=HEADERS, json=body, timeout=timeout)


def _chat(content: str = "hi", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def _ref_chain(n: int) -> dict:
    """Each definition holds the next as a required property: n levels deep through $ref (~93 B each)."""
    defs = {f"a{i}": {"type": "object", "properties": {"n": {"$ref": f"#/$defs/a{i + 1}"}}, "required": ["n"]}
            for i in range(n)}  # fmt: skip
    defs[f"a{n}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/a0"}


def _alive(server: str) -> None:
    assert httpx.get(f"{server}/health", timeout=5).json()["status"] == "ok"


def test_a_deep_ref_chain_is_refused_quickly_and_the_server_lives(server):
    for links, why in ((1000, "characters of JSON"), (500, "levels deep")):  # 1000 (~93 KB) killed the process
        start = time.perf_counter()
        r = _post(server, "/v1/chat/completions", _chat(response_format={"type": "json_schema", "json_schema": {
            "name": "deep", "schema": _ref_chain(links)}}))  # fmt: skip
        assert time.perf_counter() - start < 1.0
        assert r.status_code == 400 and why in r.json()["error"]["message"]
    chain = _ref_chain(200)
    params = {"type": "object", "$defs": chain["$defs"], "properties": {"x": {"$ref": "#/$defs/a0"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": params}}
    r = _post(server, "/v1/chat/completions", _chat(tools=[tool], tool_choice="required"))
    assert r.status_code == 400 and "tools[0]" in r.json()["error"]["message"]
    _alive(server)


def test_schema_limits_are_the_documented_ones():
    validation.json_schema(_ref_chain(15))  # a real schema's depth passes
    recursive = {"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array", "items": {
        "$ref": "#/$defs/node"}}}}}, "$ref": "#/$defs/node"}  # fmt: skip
    validation.json_schema(recursive)  # a tree that refers to itself is fine: each pointer counts once a path
    with pytest.raises(ValueError, match="levels deep"):
        validation.json_schema(_ref_chain(validation.MAX_SCHEMA_DEPTH))
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(10_000)}}
    with pytest.raises(ValueError, match="characters of JSON; at most 65536"):
        validation.json_schema(wide)
    fan = {"$defs": {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 4} for i in range(12)}, "$ref": "#/$defs/d0"}
    with pytest.raises(ValueError, match="nodes once its \\$ref pointers are followed"):
        validation.json_schema(fan)  # 4**12 paths in a small body


def test_an_unsatisfiable_schema_is_an_error_not_a_cut_document(server):
    schema = {"type": "object", "properties": {"a": {"type": "string", "minLength": 5, "maxLength": 2}},
              "required": ["a"]}  # fmt: skip
    r = _post(server, "/v1/chat/completions", _chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema}}))  # fmt: skip
    assert r.status_code == 400 and "unsatisfiable" in r.json()["error"]["message"].lower()


def test_a_chunked_body_is_held_to_the_limit(default_model):
    app = create_app(default_model, api_key=KEY, max_body_bytes=100_000)

    def body():  # no Content-Length: httpx sends it chunked
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(50):
            yield b"a" * 10_000
        yield b'"}'

    with BackgroundServer(app) as url:
        r = httpx.post(f"{url}/v1/completions", headers=HEADERS, content=body(), timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        pieces = iter([b'{"model": "', MODEL.encode(), b'", "prompt": "Hi", "max_tokens": 2}'])
        small = httpx.post(f"{url}/v1/completions", headers={**HEADERS, "Content-Type": "application/json"},
                           content=pieces, timeout=60)  # fmt: skip
        assert small.status_code == 200  # a chunked body within the limit is read whole
        _alive(url)


def test_health_answers_while_a_long_text_is_tokenized(server, default_model):
    text = "The harbour lights came on one by one. " * 20_000  # 780k characters: seconds of tokenizing
    with futures.ThreadPoolExecutor(1) as pool:
        big = pool.submit(_post, server, "/tokenize", {"prompt": text})
        worst = 0.0
        while not big.done():
            start = time.perf_counter()
            _alive(server)
            worst = max(worst, time.perf_counter() - start)
            time.sleep(0.02)
        assert big.result().status_code == 200 and big.result().json()["count"] > 100_000
    assert worst < 0.1, f"/health took {worst:.3f} s while a long text was tokenized"
    # past anything the window could hold: refused from its length alone, untokenized
    huge = "x" * (default_model.context_window * validation.MAX_CHARS_PER_TOKEN + 1)
    start = time.perf_counter()
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": huge, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert time.perf_counter() - start < 1.0
    assert _post(server, "/tokenize", {"prompt": huge}).status_code == 400


def test_long_stop_lists_unknown_fields_and_sampling_extensions(server, default_model):
    r = _post(server, "/v1/chat/completions", _chat(stop=[f"s{i}" for i in range(10_000)]))
    assert r.status_code == 400 and "at most 64" in r.json()["error"]["message"]
    r = _post(server, "/v1/chat/completions", _chat(stop=["x" * (validation.MAX_STOP_CHARS + 1)]))
    assert r.status_code == 400 and f"at most {validation.MAX_STOP_CHARS}" in r.json()["error"]["message"]
    r = _post(server, "/v1/chat/completions", _chat(mirostat_tau=5.0))
    assert r.status_code == 400 and r.json()["error"]["param"] == "mirostat_tau"
    r = _post(server, "/tokenize", {"prompt": "hi", "add_special_tokens": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "add_special_tokens"
    assert _post(server, "/v1/chat/completions", _chat(user="alice", parallel_tool_calls=True)).status_code == 200
    r = _post(server, "/v1/chat/completions", _chat(top_k=0.5))
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
    # honoured: the same seed and dials give the library's answer, and they change it
    msgs = [{"role": "user", "content": "Write a word."}]
    dials = {"temperature": 1.0, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3, "seed": 11}
    got = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 12, **dials})
    want = default_model.complete(msgs, max_new_tokens=12, **dials)
    assert got.status_code == 200 and got.json()["choices"][0]["message"]["content"] == want.text
    vllm_style = _post(server, "/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 6, "top_k": -1,
                                                   "temperature": 0})  # fmt: skip
    assert vllm_style.status_code == 200  # vLLM's "every token"


def test_a_client_that_hangs_up_is_a_499_not_a_500(default_model):
    app = create_app(default_model, api_key=KEY)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000}
    with BackgroundServer(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", headers=HEADERS, json=body, timeout=1.0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and app.state.batcher.running:
            time.sleep(0.1)
        time.sleep(0.5)
        text = httpx.get(f"{url}/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("selfextend_requests_total")]
    assert any('status="499"' in line for line in lines), lines
    assert not any('status="500"' in line for line in lines), lines


def test_a_second_question_over_one_document_reports_cached_tokens(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=600)
    document = " ".join(f"Line {i}: the ship left the harbour at dawn." for i in range(60))
    first = client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": document + "\nWhen did the ship leave?"}],
    )  # fmt: skip
    second = client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": document + "\nWhat left the harbour?"}],
    )  # fmt: skip
    assert first.usage.prompt_tokens_details.cached_tokens < 0.5 * first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens > 0.8 * second.usage.prompt_tokens


def test_a_request_past_the_kv_budget_is_a_503_that_says_what_to_change(default_model):
    """A server whose memory holds a 300-token request refuses a 2,000-token one up front (it would never fit),
    and still answers what fits."""
    from selfextend_llm.engine.scheduler import kv_bytes_per_token

    budget = 300 * kv_bytes_per_token(default_model)
    with BackgroundServer(create_app(default_model, kv_budget_bytes=budget)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=_chat("word " * 2000, max_tokens=8), timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "kv_budget_exceeded"
        assert "KV budget" in r.json()["error"]["message"] and "max_tokens" in r.json()["error"]["message"]
        ok = httpx.post(f"{url}/v1/chat/completions", json=_chat("hi", max_tokens=4), timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
