"""The OpenAI-compatible server, driven by real clients over loopback."""

from __future__ import annotations

import concurrent.futures as futures
import json

import httpx
import openai
import pytest

from selfextend_llm.server import BackgroundServer, create_app

KEY = "test-key"


@pytest.fixture(scope="module")
def server(default_model):
    with BackgroundServer(create_app(default_model, api_key=KEY, max_body_bytes=2_000_000)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=600)


def test_models_lists_extended_window(client, default_model):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert models[0].context_window == default_model.context_window == 32768
    assert models[0].pretrained_context == 8192


def test_chat_completion_matches_core_and_reports_usage(client, default_model):
    msgs = [{"role": "user", "content": "What is the capital of France? One word."}]
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=8, temperature=0)
    expected = default_model.complete(msgs, max_new_tokens=8)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streaming_chat_equals_whole_and_ends_with_usage(client):
    msgs = [{"role": "user", "content": "Say something about the sea."}]
    whole = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=msgs,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_completion_with_stop(client):
    full = (
        client.completions.create(
            model="SmolLM2-135M-Instruct", prompt="Monday, Tuesday, Wednesday,", max_tokens=20, temperature=0
        )
        .choices[0]
        .text
    )
    stop = full[len(full) // 2 : len(full) // 2 + 5]
    cut = client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="Monday, Tuesday, Wednesday,", max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_errors_in_openai_shape(server, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="word " * 33_000, max_tokens=1)
    assert "33" in err.value.body["message"] and "32768" in err.value.body["message"]
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:  # one prompt of a list too long: none runs
        client.completions.create(model="SmolLM2-135M-Instruct", prompt=["Hi", "word " * 33_000], max_tokens=1)
    assert err.value.body["code"] == "context_length_exceeded"
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, content=b"{not json")
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(
        f"{server}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "SmolLM2-135M-Instruct", "messages": "hello", "max_tokens": "many"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(
        f"{server}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        content=json.dumps({"model": "x", "prompt": "a" * 3_000_000}),
    )
    assert r.status_code == 413
    assert httpx.get(f"{server}/health").json()["status"] == "ok"  # still serving


def test_client_disconnect_mid_stream_frees_the_model(server, client):
    with httpx.stream(
        "POST",
        f"{server}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
        json={"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 2000, "stream": True},
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # hang up after the first token
    reply = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2, temperature=0)
    assert reply.choices[0].text is not None


def test_concurrent_mixed_clients_get_their_own_answers(client):
    """32 clients at once, half streaming: every answer complete and equal to its sequential answer."""
    prompts = [f"The number after {n} is" for n in range(8)]

    def ask(i: int) -> str:
        kw = dict(model="SmolLM2-135M-Instruct", prompt=prompts[i % 8], max_tokens=4, temperature=0)
        if i % 2:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
        return client.completions.create(**kw).choices[0].text

    sequential = [ask(i) for i in range(8)]
    with futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(48)))
    assert answers == [sequential[i % 8] for i in range(48)]


def test_langchain_chat_openai_and_llamaindex_openai_like(server):
    from langchain_openai import ChatOpenAI
    from llama_index.llms.openai_like import OpenAILike

    lc = ChatOpenAI(base_url=f"{server}/v1", api_key=KEY, model="SmolLM2-135M-Instruct", max_tokens=8, temperature=0)
    msg = lc.invoke("Name a colour.")
    assert msg.content and msg.usage_metadata["output_tokens"] > 0
    assert "".join(c.content for c in lc.stream("Name a colour.")) == msg.content
    li = OpenAILike(
        api_base=f"{server}/v1",
        api_key=KEY,
        model="SmolLM2-135M-Instruct",
        is_chat_model=True,
        max_tokens=8,
        temperature=0,
        context_window=32768,
    )
    assert li.complete("Name a colour.").text == msg.content


def test_openai_pipeline_example_runs_against_the_server(client):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "openai_client_pipeline.py"
    spec = importlib.util.spec_from_file_location("openai_client_pipeline", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.summarise(client, "The museum opens at 9 am and closes at 5 pm.").strip()


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _wait(condition, seconds: float = 60) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_full_queue_is_a_429_with_retry_after_and_hung_up_requests_are_cancelled(default_model):
    app = create_app(default_model, api_key=KEY, max_batch=1, max_queue=1)
    batcher = app.state.batcher
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 3000}
    pool = futures.ThreadPoolExecutor(2)
    with BackgroundServer(app) as url:
        with httpx.stream("POST", f"{url}/v1/completions", headers=_headers(), json={**body, "stream": True}) as s:
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))  # it holds the only row
            # a non-streamed client that gives up while queued: its request leaves the queue
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", headers=_headers(), json=body, timeout=1.5)
            assert _wait(lambda: batcher.queue_depth == 0)
            waiting = pool.submit(
                httpx.post, f"{url}/v1/completions", headers=_headers(), json={**body, "max_tokens": 2}, timeout=120
            )
            assert _wait(lambda: batcher.queue_depth == 1)
            r = httpx.post(f"{url}/v1/completions", headers=_headers(), json=body, timeout=30)
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
            assert batcher.running == 1
        # the stream hung up: its row is cancelled, and the waiting request runs and answers
        assert waiting.result().status_code == 200
        assert _wait(lambda: batcher.running == 0)


def test_timeout_is_a_504_and_ends_a_stream_with_an_error(default_model):
    app = create_app(default_model, api_key=KEY, request_timeout=0.3)
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 3000}
    with BackgroundServer(app) as url:
        r = httpx.post(f"{url}/v1/completions", headers=_headers(), json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        with httpx.stream("POST", f"{url}/v1/completions", headers=_headers(), json={**body, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert "timeout" in lines[-2] and lines[-1] == "data: [DONE]"
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_metrics_in_prometheus_format(server, client):
    client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=3, temperature=0)
    text = httpx.get(f"{server}/metrics").text
    for name in (
        "selfextend_queue_depth",
        "selfextend_running_requests",
        "selfextend_generated_tokens_total",
        'selfextend_request_seconds_bucket{endpoint="/v1/completions"',
        "selfextend_time_to_first_token_seconds_bucket",
    ):
        assert name in text, name
    tokens = next(line for line in text.splitlines() if line.startswith("selfextend_generated_tokens_total"))
    assert float(tokens.split()[-1]) >= 3


def test_response_format_json_schema_is_valid_by_construction(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "rank": {"type": "integer"}, "big": {"type": "boolean"}},
        "required": ["city", "rank", "big"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a city."}],
        max_tokens=60,
        temperature=0.9,
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    data = json.loads(reply.choices[0].message.content)
    assert set(data) == {"city", "rank", "big"} and isinstance(data["rank"], int) and isinstance(data["big"], bool)
    r = httpx.post(
        f"{client.base_url}chat/completions", headers=_headers(), json={
            "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}},
        },
    )  # fmt: skip
    assert r.status_code == 400 and "cannot be compiled" in r.json()["error"]["message"]


def test_list_prompts_are_answered_together_one_choice_each(client):
    prompts = ["The capital of France is", "1, 2, 3,"]
    alone = [client.completions.create(model="SmolLM2-135M-Instruct", prompt=p, max_tokens=6, temperature=0)
             for p in prompts]  # fmt: skip
    both = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [a.choices[0].text for a in alone]
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"presence_penalty": 0.5}, "presence_penalty"),
     ({"frequency_penalty": 1.0}, "frequency_penalty"), ({"logit_bias": {"5": 10}}, "logit_bias")],
)  # fmt: skip
def test_parameters_this_server_does_not_do_are_refused_by_name(server, extra, param):
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], **extra}
    r = httpx.post(f"{server}/v1/chat/completions", headers=_headers(), json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert param in r.json()["error"]["message"]


def test_tokenize_and_detokenize(server, default_model):
    r = httpx.post(f"{server}/tokenize", headers=_headers(), json={"prompt": "Hello world"})
    body = r.json()
    assert body["tokens"] == default_model.tokenize("Hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == default_model.context_window
    chat = httpx.post(f"{server}/tokenize", headers=_headers(), json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.json()["count"] == default_model.count_tokens([{"role": "user", "content": "hi"}])
    back = httpx.post(f"{server}/detokenize", headers=_headers(), json={"tokens": body["tokens"]}).json()
    assert back["prompt"] == "Hello world"
    assert httpx.post(f"{server}/detokenize", headers=_headers(), json={"tokens": [10**9]}).status_code == 400
    assert httpx.post(f"{server}/tokenize", json={"prompt": "x"}).status_code == 401  # behind the key too


class _Scripted:
    """Stands in for the batcher's answer (the embedded model's template renders no tools)."""

    def __init__(self, text: str):
        self.text = text

    def __call__(self, prompt, **params):
        from selfextend_llm.model import StreamChunk

        text = self.text

        class Handle:
            def __iter__(self):
                yield StreamChunk(text[:5])
                yield StreamChunk(text[5:])
                yield StreamChunk("", "stop", 10, 7)

            def cancel(self):
                pass

        return Handle()


def test_tool_calls_come_back_in_openai_shape_whole_and_streamed(default_model, monkeypatch):
    app = create_app(default_model, api_key=KEY)
    call = '<tool_call>{"name": "read_file", "arguments": {"path": "a.txt"}}</tool_call>'
    monkeypatch.setattr(app.state.batcher, "submit", _Scripted("Let me look. " + call))
    tools = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "What is in a.txt?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "b.txt"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "nothing"},
    ]  # fmt: skip
    with BackgroundServer(app) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        reply = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, tools=tools)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
        (tc,) = choice.message.tool_calls
        assert tc.function.name == "read_file" and json.loads(tc.function.arguments) == {"path": "a.txt"}
        chunks = list(c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, tools=tools,
                                                stream=True))  # fmt: skip
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        streamed = [t for d in deltas for t in (d.tool_calls or [])]
        assert streamed[0].function.name == "read_file" and "<tool_call>" not in "".join(
            d.content or "" for d in deltas
        )
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(
                model="SmolLM2-135M-Instruct", messages=messages, tools=tools,
                tool_choice={"type": "function", "function": {"name": "delete_everything"}},
            )  # fmt: skip
        assert err.value.body["param"] == "tool_choice"


def test_forced_function_call_on_the_embedded_default_unscripted(client):
    """No scripting: tool_choice naming a tool gives one valid call from the 135M default, whole and streamed."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"]}}}]  # fmt: skip
    messages = [{"role": "user", "content": "Weather in Oslo for the next 3 days?"}]
    kw = {"model": "SmolLM2-135M-Instruct", "messages": messages, "tools": tools, "max_tokens": 60, "temperature": 0}
    for choice_value in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(tool_choice=choice_value, **kw)
        (call,) = reply.choices[0].message.tool_calls
        args = json.loads(call.function.arguments)
        assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert isinstance(args["city"], str) and isinstance(args["days"], int) and set(args) == {"city", "days"}
    chunks = list(client.chat.completions.create(tool_choice="required", stream=True, **kw))
    streamed = [t for ch in chunks if ch.choices for t in (ch.choices[0].delta.tool_calls or [])]
    assert len(streamed) == 1 and json.loads(streamed[0].function.arguments) == args
    with pytest.raises(openai.BadRequestError) as err:  # parameters that are not an object schema
        client.chat.completions.create(
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            **{k: v for k, v in kw.items() if k != "tools"},
        )
    assert err.value.body["param"] == "tools"


def test_function_calling_example_runs_against_the_server(client, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "openai_function_calling.py"
    spec = importlib.util.spec_from_file_location("openai_function_calling", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    notes = tmp_path / "notes.txt"
    notes.write_text("The museum opens at 9 am and closes at 5 pm. Entry costs 12 euros.\n")
    made, answer = example.ask_about_file(client, str(notes), "When does the museum open?")
    assert made["name"] == "read_file" and isinstance(made["arguments"]["path"], str)
    assert "9" in answer


def test_api_key_from_the_environment_and_cors(default_model, monkeypatch):
    monkeypatch.setenv("SELFEXTEND_API_KEY", "from-env")
    app = create_app(default_model, cors_origins=["http://localhost:3000"])
    with BackgroundServer(app) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
        pre = httpx.options(
            f"{url}/v1/chat/completions",
            headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"},
        )
        assert pre.headers.get("access-control-allow-origin") == "http://localhost:3000"
