"""SelfExtendConfig rules and every bad-input error, with its message."""

from __future__ import annotations

import pytest
import torch
import transformers

import selfextend_llm as se
from selfextend_llm.loading import ModelNotFoundError, load_pretrained
from selfextend_llm.stopping import emittable, find_stop, normalize_stops
from tests.conftest import tiny_model


def test_max_context_formula():
    assert se.SelfExtendConfig(4, 1024).max_context(8192) == (8192 - 1024) * 4 + 1024


@pytest.mark.parametrize(
    ("g", "w", "needle"), [(0, 512, "group_size must be >= 1"), (4, 0, "neighbor_window must be >= 1")]
)
def test_invalid_group_or_window(g, w, needle):
    with pytest.raises(ValueError, match=needle):
        se.SelfExtendConfig(g, w)


def test_window_must_leave_grouped_positions():
    with pytest.raises(ValueError, match="must be smaller than the model's trained context"):
        se.SelfExtendConfig(4, 8192).max_context(8192)


def test_for_target_keeps_grouped_positions_in_budget():
    for target in (10_000, 16_384, 32_768, 65_536):
        cfg = se.SelfExtendConfig.for_target(8192, target)
        assert cfg.max_context(8192) >= target
        # farthest grouped position used at the target stays within ~2/3 of the window
        assert (target - cfg.neighbor_window) / cfg.group_size + cfg.neighbor_window <= 8192 * 2 / 3
    assert se.SelfExtendConfig.for_target(8192, 4000).group_size == 1


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


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_pretrained(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="GGUF file"):
        load_pretrained(gguf_file=str(tmp_path / "x.gguf"))


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        load_pretrained("no-such-org/no-such-model-xyz")


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


def test_stop_helpers():
    assert normalize_stops("x") == ["x"]
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert emittable("abc<|e", ["<|end|>"]) == 3
    assert emittable("abc", ["zz"]) == 3
    with pytest.raises(TypeError):
        normalize_stops([1])


def test_rotate_composes():
    from selfextend_llm.rope import rotate

    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).double() / 16))
    x = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    a, b = torch.randint(-50, 50, (1, 5)), torch.randint(-50, 50, (1, 5))
    for layout in ("half", "interleaved"):
        assert torch.allclose(rotate(rotate(x, a, inv, layout), b, inv, layout), rotate(x, a + b, inv, layout))


def test_chosen_grouping_always_reaches_the_length():
    from selfextend_llm.tuning import choose_config

    for name in ("SmolLM2-135M-Instruct", "some-other-model"):
        for total in (9_000, 16_000, 32_768, 100_000):
            cfg = choose_config(name, 8192, total, None)
            assert cfg.max_context(8192) >= total
    assert choose_config("some-other-model", 8192, 4_000, None) is None  # plain inside the window


def test_device_map_is_passed_to_transformers(monkeypatch):
    """``load(device_map=...)`` places the model through ``from_pretrained`` instead of ``.to(device)``."""
    import transformers

    import selfextend_llm

    seen = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    model = selfextend_llm.load(device_map={"": "cpu"})
    assert seen and seen[-1]["device_map"] == {"": "cpu"} and "tp_plan" not in seen[-1]
    assert str(model.device) == "cpu"
    assert model.complete("The capital of France is", max_new_tokens=2).completion_tokens >= 1
