"""Exactness of SelfExtend on tiny random-weight models of every supported RoPE family."""

from __future__ import annotations

import pytest
import torch

import selfextend_llm as se
from tests.helpers import FAMILIES, TRAINED, tiny_model

SEQ = 150  # > 2x the tiny trained window


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits.double()


def close(a, b, tol=2e-4):
    err = (a - b).abs().max().item()
    assert err < tol, f"max abs difference {err}"


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def test_group_size_one_equals_plain(family):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (2, SEQ))
    plain = logits(model, ids)
    se.apply(model, se.SelfExtendConfig(1, 8))
    assert model._selfextend_settings.calls == 0
    close(logits(model, ids), plain)
    assert model._selfextend_settings.calls > 0  # the SelfExtend path really ran


def test_window_covering_sequence_equals_plain(family):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (1, 40))
    plain = logits(model, ids)
    se.apply(model, se.SelfExtendConfig(4, 48))
    close(logits(model, ids), plain)


def test_grouped_matches_reference_formula(family):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (2, SEQ))
    plain = logits(model, ids)
    se.apply(model, se.SelfExtendConfig(4, 16))
    model._selfextend_settings.block_size = 48  # several blocks, lengths not multiples of it
    fast = logits(model, ids)
    model.set_attn_implementation("selfextend_reference")
    reference = logits(model, ids)
    close(fast, reference)
    # grouping really changed the result, by far more than the rounding between the two
    assert (fast - plain).abs().max() > 20 * (fast - reference).abs().max()


def test_incremental_decoding_equals_full_forward(family):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (1, SEQ))
    se.apply(model, se.SelfExtendConfig(3, 12))
    full = logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :100], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(100, SEQ):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    close(torch.cat(steps, 1).double(), full)


def test_chunked_prefill_equals_one_shot(family):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (1, SEQ))
    se.apply(model, se.SelfExtendConfig(4, 10))
    full = logits(model, ids)
    with torch.no_grad():
        chunks, cache = [], None
        for t0 in (0, 37, 90, 91, 133):
            t1 = {0: 37, 37: 90, 90: 91, 91: 133, 133: SEQ}[t0]
            out = model(ids[:, t0:t1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            chunks.append(out.logits)
    close(torch.cat(chunks, 1).double(), full)


def test_left_padded_batch_equals_one_by_one(family):
    model = tiny_model(family)
    se.apply(model, se.SelfExtendConfig(4, 16))
    a, b = torch.randint(1, 97, (1, SEQ)), torch.randint(1, 97, (1, 110))
    pad = SEQ - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    batch = logits(model, ids, attention_mask=mask)
    close(batch[0], logits(model, a)[0])
    close(batch[1, pad:], logits(model, b)[0])


def test_batched_generate_equals_single(family):
    model = tiny_model(family)
    se.apply(model, se.SelfExtendConfig(4, 16))
    a, b = torch.randint(1, 97, (1, 120)), torch.randint(1, 97, (1, 90))
    pad = a.shape[1] - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **kw)
        one = model.generate(b, **kw)
    assert torch.equal(batch[1, -8:], one[0, -8:])


def test_sampled_generate_runs_and_is_seeded(family):
    model = tiny_model(family)
    se.apply(model, se.SelfExtendConfig(4, 16))
    ids = torch.randint(1, 97, (1, 100))
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(model.generate(ids, max_new_tokens=6, do_sample=True, temperature=1.0, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


def test_remove_restores_plain(family):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (1, SEQ))
    plain = logits(model, ids)
    se.apply(model, se.SelfExtendConfig(4, 16))
    assert se.is_applied(model)
    se.remove(model)
    assert not se.is_applied(model)
    close(logits(model, ids), plain, tol=1e-6)


def test_trained_window_reported():
    model = tiny_model("llama")
    from selfextend_llm.hf.apply import pretrained_context

    assert pretrained_context(model) == TRAINED


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["dynamic-ntk", "yarn"])
def test_rope_scaling_baselines_run_on_every_family_and_restore_it(family, method):
    """The grids' baselines: past the window the global layers' RoPE is rescaled; afterwards it is the model's own.

    Gemma 3 keeps one RoPE per layer type: only ``full_attention`` is rescaled, the sliding layers keep theirs."""
    from types import SimpleNamespace

    from selfextend_llm.evaluation import Method, _rotary, using

    model = tiny_model(family)
    ids = torch.randint(0, 97, (1, 3 * TRAINED))
    with torch.no_grad():
        before = model(ids).logits
        with using(SimpleNamespace(model=model, pretrained_context=TRAINED), Method(method), 3 * TRAINED):
            rotary = _rotary(model)[2]
            kinds = rotary.rope_type if isinstance(rotary.rope_type, dict) else {"all": rotary.rope_type}
            if family == "gemma3":
                assert kinds == {"full_attention": kinds["full_attention"], "sliding_attention": "default"}
            assert {"dynamic-ntk": "dynamic", "yarn": "yarn"}[method] in kinds.values()
            scaled = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(scaled, before, atol=1e-4)  # past the window the baseline changes the answer
    torch.testing.assert_close(after, before)
