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
