"""Prefix reuse: a call that starts with a cached prompt computes only the rest, and answers the same."""

from __future__ import annotations

import pytest
import torch

from selfextend_llm.config import SelfExtendConfig
from selfextend_llm.engine import prefix_cache as pc
from selfextend_llm.engine.scheduler import ContinuousBatcher
from tests.helpers import tiny_served_model

WORDS = "the sea and the sky were grey while a ship sailed past the harbour lights at dusk".split()
DOC = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(260))  # ~260 tokens: past the 128-token window


def _model(tokenizer, **options):
    return tiny_served_model(tokenizer, layers=2, hidden=64, context_window=600, adaptive=True, **options)


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.mark.parametrize("fast", [True, False], ids=["static-cache", "dynamic-cache"])
def test_second_question_reuses_the_document_and_answers_the_same(tokenizer, fast):
    cached = _model(tokenizer, fast_generation=fast)
    fresh = _model(tokenizer, fast_generation=fast, prefix_cache_bytes=0)
    first = cached.complete(DOC + " Question one?", max_new_tokens=8)
    assert first.cached_tokens == 0 and len(cached.prefix_cache) == 1
    for question in (" Question two?", " And a third, longer question about the ships?"):
        got = cached.complete(DOC + question, max_new_tokens=8)
        want = fresh.complete(DOC + question, max_new_tokens=8)
        assert got.cached_tokens > 0.9 * len(cached.encode(DOC))  # the document, not computed again
        assert (got.text, got.prompt_tokens, got.completion_tokens) == (
            want.text, want.prompt_tokens, want.completion_tokens,
        )  # fmt: skip
        assert cached.describe()["last_call"]["cached_tokens"] == got.cached_tokens
    assert fresh.complete(DOC, max_new_tokens=2).cached_tokens == 0  # a budget of 0 turns reuse off


def test_the_same_prompt_again_and_a_stream_reuse_it(tokenizer):
    model = _model(tokenizer)
    a = model.complete(DOC, max_new_tokens=6)
    b = model.complete(DOC, max_new_tokens=6)
    assert b.cached_tokens == b.prompt_tokens - 1  # one token is always computed: it gives the logits
    assert b.text == a.text
    chunks = list(model.stream_chunks(DOC, max_new_tokens=6))
    assert "".join(c.text for c in chunks) == a.text and chunks[-1].cached_tokens == b.cached_tokens


def test_a_conversation_that_goes_on_reuses_the_answer_too(tokenizer):
    model = _model(tokenizer)
    first = model.complete(DOC, max_new_tokens=10)
    follow = DOC + first.text + " and then?"
    got = model.complete(follow, max_new_tokens=4)
    assert got.cached_tokens >= len(model.encode(DOC))  # prompt and (part of) the answer reused


def test_batched_calls_reuse_the_prefix_and_match_alone(tokenizer):
    model = _model(tokenizer, fast_generation=False)
    fresh = _model(tokenizer, fast_generation=False, prefix_cache_bytes=0)
    questions = [DOC + f" Question {i}?" for i in range(5)]
    batcher = ContinuousBatcher(model, max_batch=8, prefill_chunk=64)
    try:
        handles = [batcher.submit(q, max_new_tokens=6) for q in questions]
        got = [h.result() for h in handles]
    finally:
        batcher.close()
    want = [fresh.complete(q, max_new_tokens=6) for q in questions]
    assert [g.text for g in got] == [w.text for w in want]
    # all but the first waited for its prefill and then reused the document
    assert sum(g.cached_tokens > 200 for g in got) >= 4


def test_a_different_grouping_is_never_taken_for_a_short_shared_head(tokenizer):
    model = _model(tokenizer)
    long_prompt = DOC + " end"
    model.complete(long_prompt, max_new_tokens=2)  # cached under the grouping of a long prompt
    assert model.last_call["grouping"] != "plain"
    head = " ".join(DOC.split()[:30])  # ~30 shared tokens of a ~75-token prompt that fits the window
    got = model.complete(head + " but then" + " a different ending" * 10, max_new_tokens=2)
    assert model.last_call["grouping"] == "plain" and got.cached_tokens == 0


def test_lru_budget_and_subsumed_entries():
    cache = pc.PrefixCache(max_bytes=3 * 2 * 4 * 100)  # three entries of 100 tokens (one layer, k and v)

    def kv(n):
        return [torch.zeros(1, 1, n, 1)], [torch.zeros(1, 1, n, 1)]

    for start in range(4):
        cache.store(list(range(start * 1000, start * 1000 + 100)), None, *kv(100))
    assert [e.tokens[0].item() for e in cache.entries()] == [1000, 2000, 3000]  # the oldest went first
    cache.store(list(range(3000, 3000 + 50)), None, *kv(50))  # already held by a longer entry: not kept
    assert len(cache) == 3
    cache.store(list(range(3000, 3000 + 120)), None, *kv(120))  # extends an entry: replaces it
    # the extension replaced its prefix, and (120 tokens being more than 100) pushed the oldest out
    assert [(e.tokens[0].item(), e.length) for e in cache.entries()] == [(2000, 100), (3000, 120)]
    hit = cache.lookup(list(range(3000, 3060)) + [7], lambda c, n: True)
    assert hit is not None and hit.length == 60
    assert cache.lookup(list(range(3000, 3060)), lambda c, n: c == SelfExtendConfig(2, 8)) is None
    with pytest.raises(ValueError, match="must hold 20 tokens"):
        cache.store(list(range(5)) * 4, None, *kv(3))
    with pytest.raises(ValueError, match="whole number of bytes"):
        pc.PrefixCache(-1)


def test_prompt_cache_on_disk_skips_the_prefill_in_another_model(tokenizer, tmp_path):
    writer = _model(tokenizer)
    path = tmp_path / "doc.kv"
    saved = writer.save_prompt_cache(DOC, path)
    assert saved == len(writer.encode(DOC))
    reader = _model(tokenizer)  # same weights (seeded), a new process would be the same
    assert reader.load_prompt_cache(path) == saved
    got = reader.complete(DOC + " Question?", max_new_tokens=6)
    want = _model(tokenizer, prefix_cache_bytes=0).complete(DOC + " Question?", max_new_tokens=6)
    assert got.cached_tokens == saved and got.text == want.text
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="delete it and save it again"):
        reader.load_prompt_cache(path)
    with pytest.raises(FileNotFoundError, match="save_prompt_cache"):
        reader.load_prompt_cache(tmp_path / "missing.kv")
    other = tiny_served_model(tokenizer, layers=3, hidden=64, context_window=600)
    writer.save_prompt_cache(DOC, path)
    with pytest.raises(ValueError, match="another shape"):
        other.load_prompt_cache(path)


def test_budget_errors_say_what_to_change(tokenizer, tmp_path, monkeypatch):
    off = _model(tokenizer, prefix_cache_bytes=0)
    with pytest.raises(ValueError, match="prefix cache is off"):
        off.cache_prompt(DOC)
    small = _model(tokenizer, prefix_cache_bytes=4096)  # far below one 260-token prompt's keys
    with pytest.raises(ValueError, match="larger prefix_cache_bytes"):
        small.save_prompt_cache(DOC, tmp_path / "doc.kv")
    _model(tokenizer).save_prompt_cache(DOC, tmp_path / "doc.kv")
    with pytest.raises(ValueError, match="larger prefix_cache_bytes"):
        small.load_prompt_cache(tmp_path / "doc.kv")
    monkeypatch.setenv("SELFEXTEND_PREFIX_CACHE_BYTES", "lots")
    with pytest.raises(ValueError, match="whole number of bytes"):
        pc.default_budget(torch.device("cpu"))
    monkeypatch.setenv("SELFEXTEND_PREFIX_CACHE_BYTES", "-5")
    with pytest.raises(ValueError, match=">= 0"):
        pc.default_budget(torch.device("cpu"))
    monkeypatch.setenv("SELFEXTEND_PREFIX_CACHE_BYTES", "0")
    assert pc.default_budget(torch.device("cpu")) == 0
    torch.save({"format": 0}, tmp_path / "old.kv")
    with pytest.raises(ValueError, match="save it again with this version"):
        small.load_prompt_cache(tmp_path / "old.kv")
