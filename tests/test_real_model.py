"""The embedded default model, offline: long-context retrieval and the SelfExtendModel API."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

import selfextend_llm
from selfextend_llm.model import ContextWindowExceededError
from selfextend_llm.tasks.passkey import passkey_prompt


def test_default_loads_offline_with_extended_window(default_model):
    assert default_model.model_name == "SmolLM2-135M-Instruct"
    assert default_model.pretrained_context == 8192
    assert default_model.context_window == 4 * 8192
    assert selfextend_llm.is_applied(default_model.model)


def test_passkey_at_one_and_a_half_trained_windows(default_model):
    """SelfExtend finds the key in ~12k tokens; the plain model, same prompt, does not."""
    prompt = passkey_prompt(12_000, depth=0.4, seed=1, count_tokens=default_model.count_tokens)
    assert 11_500 < default_model.count_tokens(prompt.text) <= 12_100
    answer = default_model.generate(prompt.text, max_new_tokens=10)
    assert prompt.passkey in answer
    selfextend_llm.remove(default_model.model)
    try:
        ids = torch.tensor([default_model.encode(prompt.text)])
        with torch.inference_mode():
            out = default_model.model.generate(ids, max_new_tokens=10, do_sample=False)
        plain = default_model.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    finally:
        selfextend_llm.apply(default_model.model, default_model.config)
    assert prompt.passkey not in plain


def test_prompt_past_window_is_refused(default_model):
    text = "word " * (default_model.context_window + 10)
    with pytest.raises(ContextWindowExceededError, match=rf"longer than the context window of {32768} tokens"):
        default_model.generate(text)


def test_chat_messages_use_template(default_model):
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    assert default_model.count_tokens(msgs) > default_model.count_tokens(msgs[0]["content"])
    assert "paris" in default_model.generate(msgs, max_new_tokens=12).lower()


def pick_stop(model, text: str) -> str:
    """A piece from the middle of ``text`` that spans at least two tokens."""
    for size in range(4, 12):
        stop = text[len(text) // 2 : len(text) // 2 + size]
        if len(model.tokenizer(stop, add_special_tokens=False)["input_ids"]) >= 2 and stop.strip():
            return stop
    raise AssertionError(f"no multi-token piece in {text!r}")


def test_stop_strings_of_several_tokens_are_cut(default_model):
    prompt = "Monday, Tuesday, Wednesday,"
    full = default_model.generate(prompt, max_new_tokens=30)
    stop = pick_stop(default_model, full)
    cut = default_model.generate(prompt, max_new_tokens=30, stop=["never-appears", stop])
    assert cut == full[: full.index(stop)]
    streamed = "".join(default_model.stream(prompt, max_new_tokens=30, stop=["never-appears", stop]))
    assert streamed == cut


def test_stream_equals_generate_and_reports_usage(default_model):
    msgs = [{"role": "user", "content": "Say hello."}]
    whole = default_model.complete(msgs, max_new_tokens=8)
    chunks = list(default_model.stream_chunks(msgs, max_new_tokens=8))
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason
    assert chunks[-1].prompt_tokens == whole.prompt_tokens == default_model.count_tokens(msgs)
    assert whole.completion_tokens == 8 and whole.finish_reason == "length"


def test_abandoned_stream_frees_the_model(default_model):
    gen = default_model.stream("Once upon a time", max_new_tokens=64)
    next(gen)
    gen.close()
    assert default_model.generate("Once upon a time", max_new_tokens=3)


def test_threads_get_the_same_answers_as_sequential(default_model):
    prompts = [f"The number after {n} is" for n in (3, 11, 41)]
    sequential = [default_model.generate(p, max_new_tokens=4) for p in prompts]
    results: dict[int, str] = {}
    threads = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(i, default_model.generate(prompts[i], max_new_tokens=4))
        )
        for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(3)] == sequential


def test_batch_equals_single(default_model):
    prompts = ["The capital of Italy is", "One, two, three, four,"]
    batch = default_model.complete_batch(prompts, max_new_tokens=5)
    assert [c.text for c in batch] == [default_model.generate(p, max_new_tokens=5) for p in prompts]


@pytest.fixture
def static_cache_model(default_model, monkeypatch):
    """The default model on the fast path's static cache, run eagerly (compiling the real model
    takes over a minute on the CPU; compiled steps are checked on tiny models)."""
    fast = default_model.fast
    original = fast.generate_kwargs

    def eager_static(batch, total):
        kwargs = original(batch, total)
        kwargs.pop("compile_config", None)
        return kwargs

    monkeypatch.setattr(fast, "generate_kwargs", eager_static)
    monkeypatch.setattr(fast, "enabled", True)
    yield default_model
    fast._cache = fast._cache_key = None
    selfextend_llm.clear_cache(default_model.model)


def test_static_cache_gives_the_dynamic_tokens_past_the_trained_window(default_model, static_cache_model):
    """A fixed G=4, W=512 makes a 2.5k-token prompt group; fp32 tokens are the dynamic cache's."""
    prompt = passkey_prompt(2_500, depth=0.3, seed=4, count_tokens=default_model.count_tokens).text
    settings = selfextend_llm.hf.apply.settings_of(default_model.model)
    fixed = selfextend_llm.SelfExtendConfig(4, 512)
    plan, default_model.plan = default_model.plan, dataclasses.replace(default_model.plan, config=fixed, adaptive=False)
    config = settings.config
    try:
        fast = [c.text for c in default_model.complete_batch([prompt, prompt[:3000]], max_new_tokens=12)]
        streamed = "".join(default_model.stream(prompt, max_new_tokens=12))
        assert default_model.fast._cache is not None  # the static cache really served these calls
        default_model.fast.enabled = False
        slow = [c.text for c in default_model.complete_batch([prompt, prompt[:3000]], max_new_tokens=12)]
    finally:
        default_model.plan = plan
        settings.config = config
    assert fast == slow and streamed == slow[0]
    assert settings.calls > 0


def test_compile_failure_falls_back_without_losing_or_repeating_tokens(default_model, monkeypatch):
    """A model that fails to compile at the 3rd token: one warning, and the stream carries on
    on the dynamic cache from the tokens it already sent."""
    prompt = "Monday, Tuesday, Wednesday,"
    expected = default_model.generate(prompt, max_new_tokens=12)
    real_generate = default_model.model.generate

    def failing_generate(*args, **kwargs):
        if "compile_config" in kwargs:
            kwargs.pop("compile_config")
            budget = {"left": 3}

            def stop_after_three(input_ids, scores=None, **_):
                budget["left"] -= 1
                if budget["left"] < 0:
                    raise torch._dynamo.exc.Unsupported("graph break in a custom op of this model")
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

            kwargs["stopping_criteria"] = [*kwargs["stopping_criteria"], stop_after_three]
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(default_model.model, "generate", failing_generate)
    monkeypatch.setattr(default_model.fast, "enabled", True)
    monkeypatch.setattr(default_model.fast, "compile", True)  # as on a GPU
    monkeypatch.setattr(default_model.fast, "failed", None)
    try:
        with pytest.warns(RuntimeWarning, match="falling back to the dynamic cache"):
            streamed = "".join(default_model.stream(prompt, max_new_tokens=12))
        assert streamed == expected
        assert "graph break" in default_model.describe()["fast_generation"]["failed"]
        assert default_model.generate(prompt, max_new_tokens=12) == expected  # later calls: dynamic, no warning
    finally:
        default_model.fast._cache = default_model.fast._cache_key = None
