"""The batcher's KV cache (engine/batch_cache.py): what transformers' dynamic cache holds, without a copy a step."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from selfextend_llm.engine.batch_cache import GROW_MIN, BatchCache


def _steps(cache, chunks):
    return [cache.update(k, v, 0) for k, v in chunks]


def test_holds_what_the_dynamic_cache_holds_and_writes_a_step_in_place():
    torch.manual_seed(0)
    chunks = [(torch.randn(2, 3, n, 8), torch.randn(2, 3, n, 8)) for n in (40, 1, 1, 30, 1)]
    want, got = _steps(DynamicCache(), chunks), _steps(BatchCache(), chunks)
    for (wk, wv), (gk, gv) in zip(want, got, strict=True):
        assert torch.equal(wk, gk) and torch.equal(wv, gv)
    layer = BatchCache()
    layer.update(*chunks[0], 0)
    before = layer.layers[0].keys
    pointer = before.data_ptr()
    kept = before.clone()
    for _ in range(GROW_MIN - 1):  # inside the room: no new buffer
        layer.update(torch.ones(2, 3, 1, 8), torch.ones(2, 3, 1, 8), 0)
    assert layer.layers[0].keys.data_ptr() == pointer and layer.get_seq_length() == 40 + GROW_MIN - 1
    assert torch.equal(before, kept)  # a view handed out earlier (the prefix cache keeps some) never changes


def test_assigned_tensors_are_taken_as_they_are_and_never_written():
    cache = BatchCache()
    cache.update(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), 0)
    joined = torch.arange(16.0).reshape(2, 1, 4, 2)  # rows joining: the batcher assigns a concatenation
    layer = cache.layers[0]
    layer.keys, layer.values = joined, joined.clone()
    snapshot = joined.clone()
    keys, values = cache.update(torch.full((2, 1, 1, 2), -1.0), torch.full((2, 1, 1, 2), -1.0), 0)
    assert torch.equal(joined, snapshot)  # grown into a new buffer, the assigned tensor untouched
    assert keys.shape == (2, 1, 5, 2) and torch.equal(keys[:, :, :4], joined) and (keys[:, :, 4] == -1).all()
    assert cache.get_seq_length() == 5 and torch.equal(values[:, :, :4], snapshot)
