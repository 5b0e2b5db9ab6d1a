"""Whole CPU decode steps in one C call (:mod:`selfextend_llm.hf.native_step`, ``kernels/native/step.c``).

Every native step is checked against the model's own forward (the C kernels off) and against a
full forward through the float64 reference attention; the cache it leaves is the one the model
would leave, so native and eager steps can alternate; and every call it cannot take is handed
to the model's forward, with the reason counted.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import DynamicCache, StaticCache

import selfextend_llm as se
from selfextend_llm.config import SelfExtendConfig
from selfextend_llm.hf import native_step
from selfextend_llm.kernels import native
from selfextend_llm.kernels.native import step as kernel_step
from tests.helpers import tiny_model

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"C kernels not built: {native.unavailable()}")

CONFIGS = {
    "plain": None,
    "grouped": SelfExtendConfig(3, 12),
    "grouped+log": SelfExtendConfig(4, 10, log_scale=True),
    "grouped+log0.5": SelfExtendConfig(4, 10, log_scale=0.5),  # the C step takes the factor the strength gives
}
PROMPT, NEW = 100, 24  # the tiny models' trained window is 64: grouping from the first step


def _padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    ids = torch.randint(1, 97, (2, PROMPT))
    mask = torch.ones_like(ids)
    ids[1, :30], mask[1, :30] = 0, 0  # left padding on the second row
    return ids, mask


def _model(family: str, config: SelfExtendConfig | None):
    model = tiny_model(family)
    if config is not None:
        se.apply(model, config)
    runner = native_step.install(model)
    assert isinstance(runner, native_step.NativeDecoder), runner
    return model, runner


def _generate(model, ids, mask, native_on: bool, capacity: int = 256):
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    with torch.inference_mode(), contextlib.nullcontext() if native_on else native.disabled():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, past_key_values=cache,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out, cache


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("setting", sorted(CONFIGS))
def test_native_steps_give_the_models_logits_and_tokens(family, setting):
    """Batch of two with left padding: same greedy tokens and logits as the model's own forward."""
    model, runner = _model(family, CONFIGS[setting])
    ids, mask = _padded_batch()
    native_out, _ = _generate(model, ids, mask, native_on=True)
    assert runner.steps == NEW - 1  # every step after the prefill
    eager_out, _ = _generate(model, ids, mask, native_on=False)
    assert torch.equal(native_out.sequences, eager_out.sequences)
    for a, b in zip(native_out.scores, eager_out.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("setting", ["plain", "grouped"])  # the reference has no log scaling
def test_native_steps_match_the_float64_reference(setting):
    """Each step's logits against one full forward (no cache) through the float64 reference attention."""
    model, _ = _model("llama", CONFIGS[setting])
    ids = torch.randint(1, 97, (1, PROMPT))
    out, _ = _generate(model, ids, None, native_on=True)
    impl = model.config._attn_implementation
    model.set_attn_implementation("selfextend_reference" if setting != "plain" else "eager")
    try:
        with torch.no_grad():
            full = model(out.sequences).logits.double()
    finally:
        model.set_attn_implementation(impl)
    steps = torch.stack([s.double() for s in out.scores], 1)
    reference = full[:, PROMPT - 1 : PROMPT - 1 + NEW]
    assert (steps - reference).abs().max().item() < 2e-4


def test_the_cache_is_left_as_the_models_forward_leaves_it():
    """Keys, values, lengths and SelfExtend's grouped-key mirror, native against eager."""
    model, _ = _model("qwen2", CONFIGS["grouped"])  # q/k/v biases too
    ids, mask = _padded_batch(1)
    _, native_cache = _generate(model, ids, mask, native_on=True)
    native_mirrors = [layer.self_attn._selfextend.static_keys.keys.clone() for layer in model.model.layers]
    _, eager_cache = _generate(model, ids, mask, native_on=False)
    eager_mirrors = [layer.self_attn._selfextend.static_keys.keys for layer in model.model.layers]
    for a, b in zip(native_cache.layers, eager_cache.layers, strict=True):
        assert int(a.cumulative_length) == int(b.cumulative_length) == PROMPT + NEW - 1
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-5)
    for a, b in zip(native_mirrors, eager_mirrors, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_native_and_eager_steps_can_alternate():
    model, runner = _model("llama", CONFIGS["grouped"])
    ids = torch.randint(1, 97, (1, PROMPT))
    want, _ = _generate(model, ids, None, native_on=False)
    cache = StaticCache(config=model.config, max_cache_len=256)
    with torch.inference_mode():
        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        tokens = []
        for t in range(NEW - 1):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            with contextlib.nullcontext() if t % 2 else native.disabled():
                logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(logits, want.scores[t + 1], rtol=0, atol=1e-5)
    assert runner.steps == (NEW - 1) // 2
    assert torch.equal(torch.cat(tokens, 1), want.sequences[:, PROMPT : PROMPT + NEW - 1])


def test_a_swapped_weight_is_read_again():
    model, runner = _model("llama", None)
    ids = torch.randint(1, 97, (1, PROMPT))
    _generate(model, ids, None, native_on=True)
    proj = model.model.layers[1].mlp.down_proj
    proj.weight = torch.nn.Parameter(torch.randn_like(proj.weight))  # a new tensor, not an in-place change
    native_out, _ = _generate(model, ids, None, native_on=True)
    eager_out, _ = _generate(model, ids, None, native_on=False)
    for a, b in zip(native_out.scores, eager_out.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_calls_it_cannot_take_go_to_the_models_forward():
    model, runner = _model("llama", CONFIGS["grouped"])
    ids = torch.randint(1, 97, (1, PROMPT))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, past_key_values=DynamicCache())
    assert runner.steps == 0 and runner.declined == {}  # a dynamic cache is not a static-cache step at all
    wide = torch.randint(1, 97, (kernel_step.MAX_BATCH + 1, 80))
    with torch.inference_mode():
        model.generate(wide, max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert runner.steps == 0 and runner.declined == {"batch or cache layout": 2}
    cache = StaticCache(config=model.config, max_cache_len=128)
    token = ids[:, -1:]
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        model(token, past_key_values=cache, use_cache=True, output_attentions=True)
        with torch.enable_grad():
            model(token, past_key_values=cache, use_cache=True)
        with native.disabled():
            model(token, past_key_values=cache, use_cache=True)
        model.train()  # dropout would apply in the model's own layers
        model(token, past_key_values=cache, use_cache=True)
        model.eval()
    assert runner.steps == 0
    assert runner.declined["attentions or hidden states asked for"] == 1
    assert runner.declined["gradients on, training mode, or compiling"] == 2
    assert runner.declined["C kernels off"] == 1


def test_selfextend_without_a_mirror_for_this_cache_is_declined():
    model, runner = _model("llama", CONFIGS["grouped"])
    ids = torch.randint(1, 97, (1, PROMPT))
    cache = StaticCache(config=model.config, max_cache_len=256)
    with torch.inference_mode():
        model(ids, past_key_values=cache, use_cache=True)
        for layer in model.model.layers:
            layer.self_attn._selfextend.static_keys = None  # as if another cache's prefill had replaced it
        model(ids[:, -1:], past_key_values=cache, use_cache=True)
    assert runner.steps == 0 and runner.declined == {"no grouped-key mirror for this cache": 1}


@pytest.mark.parametrize("family", ["gemma3", "phi3", "cohere", "qwen3"])
def test_other_families_are_not_wrapped_and_say_why(family):
    model = tiny_model(family)
    forward = model.model.forward
    why = native_step.install(model)
    assert isinstance(why, str) and why
    assert model.model.forward == forward


def test_a_sliding_window_mistral_is_not_wrapped():
    model = tiny_model("mistral")
    model.config.sliding_window = 32
    assert native_step.install(model) == "sliding-window attention"


def test_uninstall_restores_the_decoders_forward():
    model, runner = _model("llama", None)
    assert native_step.install(model) is runner  # idempotent
    native_step.uninstall(model)
    assert "forward" not in vars(model.model)
    ids = torch.randint(1, 97, (1, PROMPT))
    _generate(model, ids, None, native_on=True)
    assert runner.steps == 0


def test_default_model_decodes_natively_with_the_same_tokens(default_model, monkeypatch):
    """The embedded default (GGUF blocks), grouped past a small window: same tokens as its own forward."""
    runner = default_model.native_decoder
    assert isinstance(runner, native_step.NativeDecoder)
    assert default_model.describe()["cpu_kernels"]["decode_step"]["native"] is True
    prompt = ("The grass is green. The sky is blue. The pass key is 41872. Remember it. " * 30) + "The pass key is"
    before = runner.steps
    monkeypatch.setattr(type(default_model.plan), "config_for", lambda self, n, chat=False: SelfExtendConfig(4, 128))
    got = default_model.complete(prompt, max_new_tokens=12, temperature=0)  # grouped from 128 tokens on
    assert runner.steps - before == got.completion_tokens - 1
    with native.disabled():
        want = default_model.complete(prompt, max_new_tokens=12, temperature=0)
    assert got.completion_tokens == want.completion_tokens and got.text == want.text


def test_key_valid_reads_every_mask_form_transformers_passes():
    """The private mask parser: a 2-D padding mask, a one-row key mask (alone or by layer type), and refusals."""
    parse = native_step.NativeDecoder._key_valid
    assert parse(None, 2, 5) is None
    padding = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    assert parse(padding, 2, 5).tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert parse(torch.ones(2, 5, dtype=torch.long), 2, 5) is None  # no padding: no mask at all
    row = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
    row[:, :, :, :5] = True
    row[1, :, :, :2] = False
    assert parse(row, 2, 5).tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert parse({"full_attention": row}, 2, 5).tolist() == parse(row, 2, 5).tolist()
    assert parse(torch.ones(1, 1, 1, 8, dtype=torch.bool)[..., :5], 2, 5) is None  # broadcast over the batch
    ahead = row.clone()
    ahead[0, 0, 0, 6] = True  # a slot past the sequence is visible: not a decode step's mask
    assert parse(ahead, 2, 5) == "attention mask shows slots past the sequence"
    for bad in (torch.zeros(2, 1, 3, 8, dtype=torch.bool), torch.zeros(2, 1, 1, 8), torch.ones(2, 4), {"sliding": row}):
        assert isinstance(parse(bad, 2, 5), str)


def test_projections_the_kernel_cannot_read_are_named():
    """``linear_problem`` (and the block checks it shares with the C product) says what is wrong with a weight."""
    from selfextend_llm.kernels.quantized import QuantizedWeight

    def blocks(out: int, n_blocks: int, **kw) -> QuantizedWeight:
        codes = kw.get("codes", torch.zeros(out, n_blocks, 16, dtype=torch.uint8))
        return QuantizedWeight(codes, kw.get("scale", torch.ones(out, n_blocks)), torch.zeros(out, n_blocks), "Q4_1")

    assert kernel_step.linear_problem(blocks(4, 2), None) is None
    assert kernel_step.linear_problem(torch.zeros(4, 64), torch.zeros(4)) is None
    assert "not fp32" in kernel_step.linear_problem(torch.zeros(4, 64, dtype=torch.float16), None)
    assert "not fp32 contiguous" in kernel_step.linear_problem(torch.zeros(64, 4).t(), None)
    assert "bias" in kernel_step.linear_problem(torch.zeros(4, 64), torch.zeros(4, dtype=torch.float64))
    assert "block format" in kernel_step.linear_problem(blocks(4, 2, codes=torch.zeros(4, 2, 32)), None)
    assert "scales not fp32" in kernel_step.linear_problem(blocks(4, 2, scale=torch.ones(4, 2).half()), None)
    strided = blocks(4, 2, codes=torch.zeros(2, 4, 16, dtype=torch.uint8).transpose(0, 1))
    assert "not contiguous" in kernel_step.linear_problem(strided, None)
    assert "32,768 input features" in kernel_step.linear_problem(blocks(1, kernel_step.MAX_BLOCKS + 1), None)


def test_a_layer_the_kernel_does_not_implement_keeps_the_model_unwrapped():
    model = tiny_model("llama")
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()
    assert native_step.install(model) == "MLP activation GELU, not SiLU"
    model = tiny_model("llama")
    model.model.layers[0].self_attn.q_proj = torch.nn.Sequential(model.model.layers[0].self_attn.q_proj)
    assert native_step.install(model) == "q: Sequential is not a linear layer the kernel reads"
    assert "forward" not in vars(model.model)
