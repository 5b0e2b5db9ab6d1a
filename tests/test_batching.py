"""Continuous batching: every request gets exactly what it would get alone, whatever runs beside it."""

from __future__ import annotations

import concurrent.futures as futures
import time

import pytest
import torch

from selfextend_llm.batching import ContinuousBatcher, QueueFullError, RequestTimeoutError, ShuttingDownError
from selfextend_llm.tasks.passkey import passkey_prompt
from tests.helpers import tiny_served_model


@pytest.fixture(scope="module")
def tiny(default_model):
    """Two layers, trained on 128 tokens, adaptive grouping: prompts past 128 tokens group, shorter
    ones run plain, so one batcher runs two batches (one per grouping) side by side."""
    return tiny_served_model(
        default_model.tokenizer, layers=2, hidden=64, context_window=600, adaptive=True, fast_generation=False
    )


def _prompts(n: int) -> list[str]:
    words = "the sea and the sky were grey while a ship sailed past the harbour lights at dusk".split()
    return [" ".join(words[(i * 3 + j) % len(words)] for j in range(5 + 37 * i)) for i in range(n)]


def test_batched_greedy_equals_alone_across_groupings_and_chunked_prefill(tiny):
    prompts = _prompts(8)  # from ~6 to ~300 tokens: both plain and grouped rows
    lengths = [len(tiny.encode(p)) for p in prompts]
    assert min(lengths) < 100 and max(lengths) > 200
    configs = {tiny.plan.config_for(n + 12) for n in lengths}
    assert len(configs) >= 2 and None in configs  # plain and grouped batches take turns
    alone = [tiny.complete(p, max_new_tokens=12 + i) for i, p in enumerate(prompts)]
    batcher = ContinuousBatcher(tiny, max_batch=4, prefill_chunk=40)  # rows join and leave mid-run
    try:
        handles = [batcher.submit(p, max_new_tokens=12 + i) for i, p in enumerate(prompts)]
        got = [h.result() for h in handles]
    finally:
        batcher.close()
    for a, g in zip(alone, got, strict=True):
        assert (g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason) == (
            a.text, a.prompt_tokens, a.completion_tokens, a.finish_reason,
        )  # fmt: skip


def test_each_row_keeps_its_own_stops_and_seed(tiny):
    batcher = ContinuousBatcher(tiny, max_batch=8)
    try:
        prompt = _prompts(2)[1]
        alone = tiny.complete(prompt, max_new_tokens=20).text
        stop = alone[5:9]
        assert stop.strip() and stop in alone
        handles = [
            batcher.submit(prompt, max_new_tokens=20, stop=[stop]),
            batcher.submit(prompt, max_new_tokens=20, temperature=0.9, seed=7),
            batcher.submit(prompt, max_new_tokens=20, temperature=0.9, seed=7),
            batcher.submit(prompt, max_new_tokens=3),
        ]
        stopped, seeded_a, seeded_b, short = [h.result() for h in handles]
    finally:
        batcher.close()
    assert stopped.text == alone[: alone.index(stop)] and stopped.finish_reason == "stop"
    assert seeded_a.text == seeded_b.text  # same seed, same sample, though they ran as two rows
    assert short.completion_tokens == 3 and short.finish_reason == "length"


def test_stream_pieces_add_up_and_stop_strings_never_show(tiny):
    prompt = _prompts(3)[2]
    alone = tiny.complete(prompt, max_new_tokens=24).text
    stop = alone[10:14]
    batcher = ContinuousBatcher(tiny)
    try:
        chunks = list(batcher.submit(prompt, max_new_tokens=24, stop=[stop]))
    finally:
        batcher.close()
    assert "".join(c.text for c in chunks) == alone[: alone.index(stop)]
    assert chunks[-1].finish_reason == "stop" and all(stop not in c.text for c in chunks)


def test_full_queue_refuses_with_a_retry_hint_and_cancel_frees_the_row(tiny):
    batcher = ContinuousBatcher(tiny, max_batch=1, max_queue=1)
    try:
        running = batcher.submit(_prompts(2)[1], max_new_tokens=400)
        deadline = time.monotonic() + 30
        while batcher.running == 0 and time.monotonic() < deadline:  # admitted: the queue is empty again
            time.sleep(0.01)
        waiting = batcher.submit("hello", max_new_tokens=2)
        with pytest.raises(QueueFullError, match="busy") as err:
            batcher.submit("hello", max_new_tokens=2)
        assert err.value.retry_after >= 1
        running.cancel()  # frees the only row: the waiting one runs
        assert waiting.result().completion_tokens >= 1
    finally:
        batcher.close()


def test_timeout_and_a_failing_request_leave_the_others_running(tiny, monkeypatch):
    batcher = ContinuousBatcher(tiny, max_batch=4)
    original = batcher._forward
    poison = tiny.encode("poison pill " * 20)

    def flaky(ids, mask, positions, cache):
        if ids.shape[1] > 1 and ids[0].tolist() == poison:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(ids, mask, positions, cache)

    monkeypatch.setattr(batcher, "_forward", flaky)
    try:
        ok = batcher.submit(_prompts(2)[1], max_new_tokens=30)
        bad = batcher.submit("poison pill " * 20, max_new_tokens=5)
        slow = batcher.submit(_prompts(3)[2], max_new_tokens=500, timeout=0.5)
        with pytest.raises(torch.OutOfMemoryError, match="simulated"):
            bad.result()
        with pytest.raises(RequestTimeoutError, match="timeout"):
            slow.result()
        assert ok.result().completion_tokens == 30  # its batch went on
        assert batcher.submit("after", max_new_tokens=2).result().completion_tokens >= 1  # and the next one runs
    finally:
        batcher.close()


def test_drain_finishes_admitted_requests_and_refuses_new_ones(tiny):
    batcher = ContinuousBatcher(tiny, max_batch=2)
    handles = [batcher.submit(p, max_new_tokens=10) for p in _prompts(4)]
    with futures.ThreadPoolExecutor(1) as pool:
        closing = pool.submit(batcher.close, drain=True)
        results = [h.result() for h in handles]
        closing.result(timeout=120)
    assert all(r.completion_tokens >= 1 for r in results)
    with pytest.raises(ShuttingDownError, match="shutting down"):
        batcher.submit("late", max_new_tokens=2)


def test_real_model_batched_pass_keys_equal_alone(default_model):
    """The embedded default, SelfExtend grouping on (prompts past its tuned 2,048-token window), left-padded
    beside short rows: each answer is token for token the answer alone, and each finds its own pass key."""
    made = [passkey_prompt(2600, depth=0.3, seed=s, count_tokens=default_model.count_tokens) for s in (1, 2)]
    prompts = [m.text for m in made] + ["The capital of France is", "1, 2, 3,"]
    keys = [m.passkey for m in made]
    alone = [default_model.complete(p, max_new_tokens=8).text for p in prompts]
    batcher = ContinuousBatcher(default_model, prefill_chunk=1024)
    try:
        got = [h.result().text for h in [batcher.submit(p, max_new_tokens=8) for p in prompts]]
    finally:
        batcher.close()
    assert got == alone
    for text, key in zip(got, keys, strict=False):
        assert key in text


@pytest.mark.parametrize(
    "dials",
    [{"temperature": 0.9}, {"temperature": 1.0, "top_k": 5}, {"temperature": 0.8, "top_p": 0.9, "min_p": 0.05},
     {"temperature": 1.0, "repetition_penalty": 1.3}, {"temperature": 0.0, "repetition_penalty": 1.5}],
)  # fmt: skip
def test_seeded_sampling_is_the_same_alone_and_batched(tiny, dials):
    """One sampler (engine/sampling.py) for the single path and the batcher: a seed gives one answer, whichever
    path runs it and whatever runs beside it (before: transformers' implicit top_k=50 alone, the whole
    vocabulary batched)."""
    prompts = _prompts(4)
    alone = [tiny.complete(p, max_new_tokens=14, seed=100 + i, **dials).text for i, p in enumerate(prompts)]
    batcher = ContinuousBatcher(tiny, max_batch=8)
    try:
        handles = [batcher.submit(p, max_new_tokens=14, seed=100 + i, **dials) for i, p in enumerate(prompts)]
        got = [h.result().text for h in handles]
    finally:
        batcher.close()
    assert got == alone
    if dials.get("temperature"):  # the seed matters: another one gives another answer somewhere
        other = [tiny.complete(p, max_new_tokens=14, seed=7 + i, **dials).text for i, p in enumerate(prompts)]
        assert other != alone
