"""Continuous batching: every request gets exactly what it would get alone, whatever runs beside it."""

from __future__ import annotations

import concurrent.futures as futures
import json
import time

import pytest
import torch

from selfextend_llm.engine import scheduler as batching
from selfextend_llm.engine.scheduler import ContinuousBatcher, QueueFullError, RequestTimeoutError, ShuttingDownError
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


@pytest.fixture(scope="module")
def tiny_fast(default_model):
    """The tiny model on the fast single path (static cache; on the CPU the C decode step)."""
    return tiny_served_model(
        default_model.tokenizer, layers=2, hidden=64, context_window=600, adaptive=True, fast_generation=True
    )


def _first_chunk_then(handle, submit_more):
    """Read ``handle`` until its first text, then call ``submit_more`` (the lone request is mid-answer)."""
    it = iter(handle)
    first = next(it)
    while not first.text:
        first = next(it)
    others = submit_more()
    rest = list(it)
    text = first.text + "".join(c.text for c in rest)
    return text, rest[-1], others


def test_a_lone_request_runs_the_fast_single_path(tiny_fast):
    prompt = _prompts(3)[2]
    alone = tiny_fast.complete(prompt, max_new_tokens=16)
    assert tiny_fast.last_call["path"].startswith("static cache")
    tiny_fast.last_call = None
    batcher = ContinuousBatcher(tiny_fast)
    try:
        got = batcher.submit(prompt, max_new_tokens=16).result()
    finally:
        batcher.close()
    assert (got.text, got.completion_tokens, got.finish_reason) == (alone.text, 16, alone.finish_reason)
    assert tiny_fast.last_call["path"].startswith("static cache")  # not the batch's dynamic cache
    assert (batcher.solo_runs, batcher.handovers) == (1, 0)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    "dials",
    [{}, {"temperature": 0.9, "seed": 3}, {"temperature": 1.0, "top_k": 4, "repetition_penalty": 1.2, "seed": 5}],
)  # fmt: skip
def test_a_lone_request_hands_over_mid_answer_and_keeps_its_tokens(tiny, tiny_fast, fast, dials):
    """Alone it runs the single path; a second request arrives after its first piece of text; it goes on in
    the batch from the keys it computed: both answers are what they are alone, seed and sampler state too."""
    model = tiny_fast if fast else tiny
    first, second = _prompts(4)[3], _prompts(3)[1]
    want_first = model.complete(first, max_new_tokens=40, **dials)
    want_second = model.complete(second, max_new_tokens=10, **dials)
    batcher = ContinuousBatcher(model)
    try:
        text, last, other = _first_chunk_then(
            batcher.submit(first, max_new_tokens=40, **dials),
            lambda: batcher.submit(second, max_new_tokens=10, **dials),
        )
        got_second = other.result()
    finally:
        batcher.close()
    assert batcher.handovers == 1
    assert (text, last.completion_tokens, last.prompt_tokens) == (
        want_first.text, want_first.completion_tokens, want_first.prompt_tokens,
    )  # fmt: skip
    assert got_second.text == want_second.text


def test_handover_keeps_stop_strings_and_the_json_constraint(tiny_fast):
    prompt = _prompts(4)[3]
    plain = tiny_fast.complete(prompt, max_new_tokens=40).text
    stop = plain[-8:-4]
    assert stop.strip()
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {**schema, "required": ["name", "n"]}}}
    want_json = tiny_fast.complete(prompt, max_new_tokens=30, response_format=fmt).text
    batcher = ContinuousBatcher(tiny_fast)
    try:
        text, last, other = _first_chunk_then(
            batcher.submit(prompt, max_new_tokens=40, stop=[stop]),
            lambda: batcher.submit(prompt, max_new_tokens=30, response_format=fmt),
        )
        got_json = other.result().text
        text_json, _, _ = _first_chunk_then(
            batcher.submit(prompt, max_new_tokens=30, response_format=fmt),
            lambda: batcher.submit("hello", max_new_tokens=3),
        )
    finally:
        batcher.close()
    assert batcher.handovers >= 2
    assert text == plain[: plain.index(stop)] and last.finish_reason == "stop"
    assert got_json == want_json and text_json == want_json
    assert set(json.loads(want_json)) == {"name", "n"}  # valid, closed within its budget


def test_handover_without_the_computed_keys_prefills_them_again(tiny_fast, monkeypatch):
    """A call that lost its keys (a compile fallback) or a model without a prefix cache: the row is prefilled
    from its prompt and answer so far, and the answer is still the one alone."""
    prompt = _prompts(4)[3]
    want = tiny_fast.complete(prompt, max_new_tokens=30).text
    original = tiny_fast._keep_prefix
    monkeypatch.setattr(
        tiny_fast, "_keep_prefix", lambda seq, cache, config, handover=None: original(seq, cache, config)
    )
    budget = tiny_fast.prefix_cache.max_bytes
    tiny_fast.prefix_cache.max_bytes = 0
    batcher = ContinuousBatcher(tiny_fast)
    try:
        text, _, other = _first_chunk_then(
            batcher.submit(prompt, max_new_tokens=30), lambda: batcher.submit("hello", max_new_tokens=3)
        )
        other.result()
    finally:
        batcher.close()
        tiny_fast.prefix_cache.max_bytes = budget
    assert batcher.handovers == 1 and text == want


def test_close_without_drain_fails_running_requests_instead_of_leaving_them_waiting(tiny):
    batcher = ContinuousBatcher(tiny, max_batch=4)
    handles = [batcher.submit(p, max_new_tokens=400) for p in _prompts(3)]
    time.sleep(0.5)
    batcher.close(drain=False, timeout=60)
    for handle in handles:
        with pytest.raises(ShuttingDownError, match="shut down"):
            with futures.ThreadPoolExecutor(1) as pool:
                pool.submit(handle.result).result(timeout=30)


def test_kv_budget_refuses_what_never_fits_and_queues_what_fits_later(tiny):
    per_token = batching.kv_bytes_per_token(tiny)
    cfg = tiny.model.config
    assert per_token == cfg.num_hidden_layers * cfg.num_key_value_heads * (64 // 4) * 3 * 4  # K, V, grouped K; fp32
    prompts = _prompts(4)[2:]
    sizes = [len(tiny.encode(p)) + 30 for p in prompts]
    alone = [tiny.complete(p, max_new_tokens=30).text for p in prompts]
    running = []
    batcher = ContinuousBatcher(
        tiny, kv_budget_bytes=max(sizes) * per_token + 1, on_step=lambda depth, run, new: running.append(run)
    )  # one at a time fits, two do not
    try:
        with pytest.raises(batching.KVBudgetError, match="KV budget") as err:
            batcher.submit(prompts[0] * 3, max_new_tokens=30)
        assert "max_tokens" in str(err.value) and batching.KV_BUDGET_ENV in str(err.value)
        handles = [batcher.submit(p, max_new_tokens=30) for p in prompts]
        got = [h.result().text for h in handles]
    finally:
        batcher.close()
    assert got == alone and max(running) == 1  # the second waited for the first: never both in memory


def test_kv_budget_environment_variable(monkeypatch):
    monkeypatch.setenv(batching.KV_BUDGET_ENV, "12345")
    assert batching.default_kv_budget(torch.device("cpu")) == 12345
    monkeypatch.setenv(batching.KV_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="whole number of bytes"):
        batching.default_kv_budget(torch.device("cpu"))
    monkeypatch.delenv(batching.KV_BUDGET_ENV)
    assert batching.default_kv_budget(torch.device("cpu")) > 2**20


def test_the_old_import_path_is_the_scheduler_module_itself():
    import selfextend_llm.batching as old

    assert old is batching and old.ContinuousBatcher is ContinuousBatcher
