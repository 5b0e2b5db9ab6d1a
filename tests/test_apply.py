"""``apply`` / ``remove`` on transformers models: refused models and settings, backends, idempotence."""

from __future__ import annotations

import pytest
import torch
import transformers

import selfextend_llm as se
from tests.helpers import tiny_model


def test_non_rope_model_is_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(se.UnsupportedModelError, match="no rotary position embedding"):
        se.apply(gpt2)


def test_alibi_model_is_refused():
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=50))
    with pytest.raises(se.UnsupportedModelError, match="ALiBi"):
        se.apply(bloom)


def test_dynamic_rope_is_refused():
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )
    with pytest.raises(se.UnsupportedModelError, match="dynamic NTK"):
        se.apply(transformers.LlamaForCausalLM(cfg))


def test_window_too_large_for_model():
    with pytest.raises(ValueError, match="trained context"):
        se.apply(tiny_model("llama"), se.SelfExtendConfig(4, 64))


def test_target_beyond_reach():
    with pytest.raises(ValueError, match="beyond what G=2"):
        se.apply(tiny_model("llama"), se.SelfExtendConfig(2, 16), target_context=10_000)


def test_apply_returns_model_and_reapply_is_idempotent():
    model = tiny_model("llama")
    assert se.apply(model, se.SelfExtendConfig(2, 8)) is model
    se.apply(model, se.SelfExtendConfig(3, 8))
    assert model._selfextend_settings.config.group_size == 3
    se.remove(model)
    assert model.config._attn_implementation == "sdpa"


def test_backend_is_chosen_at_apply_and_checked():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown backend 'cudnn'; choose one of auto, split, triton"):
        se.apply(model, se.SelfExtendConfig(2, 8), backend="cudnn")
    assert not se.is_applied(model)
    ids = torch.randint(1, 97, (1, 40))
    with torch.no_grad():
        se.apply(model, se.SelfExtendConfig(2, 8), backend="math")
        assert model._selfextend_settings.backend == "math"
        by_math = model(ids).logits
        se.apply(model, se.SelfExtendConfig(2, 8))  # auto: the fused CPU kernel
        assert torch.allclose(model(ids).logits, by_math, atol=1e-4)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        se.load("/nonexistent/model", backend="fast")  # refused before any loading


def test_bypassed_layers_continue_a_cache_with_several_new_tokens_exactly():
    """Plain (bypassed) attention over a cache with more keys than queries is bottom-right causal: SDPA's
    ``is_causal`` would align the queries top-left (found by continuous batching's chunked prefill)."""
    from selfextend_llm.hf.apply import settings_of

    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, 40))
    with torch.no_grad():
        expected = model(ids).logits
        se.apply(model, se.SelfExtendConfig(2, 8))
        settings_of(model).bypass = True
        first = model(ids[:, :30], use_cache=True)
        rest = model(ids[:, 30:], past_key_values=first.past_key_values, use_cache=True).logits
    assert torch.allclose(rest, expected[:, 30:], atol=1e-5)
