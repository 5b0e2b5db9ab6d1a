"""GGUF blocks kept quantised on the CPU (:mod:`selfextend_llm.kernels.quantized`, :mod:`selfextend_llm.hf.quantized`).

The unpacking against ``gguf.quants``' own dequantisation, both kernel paths against float64 (and the many-rows
path bit for bit against ``F.linear`` over the dequantised weight), the real default model swapped layer by layer
with the same greedy tokens as its fp32 twin, the row order of llama.cpp's permuted q/k found, the block cache,
and every way the option can be misused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from selfextend_llm.hf import quantized as hq
from selfextend_llm.kernels import native
from selfextend_llm.kernels import quantized as q

FORMATS = ["Q4_0", "Q4_1", "Q8_0"]


def _raw(fmt: str, rows: int = 24, cols: int = 96, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    kind = GGMLQuantizationType[fmt]
    raw = gguf_quantize(weight, kind)
    return raw, torch.from_numpy(gguf_dequantize(raw, kind).reshape(rows, cols).astype(np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_unpacked_blocks_dequantise_to_gguf_values_bit_for_bit(fmt):
    raw, expected = _raw(fmt)
    packed = q.unpack(raw, fmt)
    assert packed.shape == tuple(expected.shape) and packed.format == fmt
    assert (packed.offset is not None) == (fmt == "Q4_1")
    assert torch.equal(q._dequantize(packed.codes, packed.scale, packed.offset), expected)  # eager
    assert torch.equal(q.dequantize(packed), expected)  # compiled
    assert packed.nbytes() < expected.numel() * expected.element_size() / 2


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1"])
def test_4bit_codes_are_kept_two_a_byte_and_old_block_caches_still_load(fmt, tmp_path):
    """The file's nibbles are kept as they are (half the bytes a decode step reads); a cache written when this package
    kept one code a byte (Q4_0 as ``q - 8`` int8) is packed again on load, to the same weight."""
    raw, expected = _raw(fmt)
    packed = q.unpack(raw, fmt)
    assert packed.codes.dtype == torch.uint8 and packed.codes.shape == (24, 3, 16)
    lanes = torch.cat([packed.codes & 15, packed.codes >> 4], -1)  # one code a byte, weight order
    old = lanes.to(torch.int8) - 8 if fmt == "Q4_0" else lanes
    assert torch.equal(q.pack_nibbles(old, fmt), packed.codes)
    cache = tmp_path / "old.safetensors"
    hq._save(cache, {"lm_head": q.QuantizedWeight(old.contiguous(), packed.scale, packed.offset, fmt)})
    loaded = hq._load(cache)["lm_head"]
    assert torch.equal(loaded.codes, packed.codes) and torch.equal(q.dequantize(loaded), expected)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, q.PRODUCT_ROWS + 5])
def test_linear_matches_float64_on_both_paths(fmt, rows):
    raw, weight = _raw(fmt, seed=rows)
    packed = q.unpack(raw, fmt)
    x = torch.randn(2, rows, weight.shape[1]) if rows > 1 else torch.randn(1, 1, weight.shape[1])
    bias = torch.randn(weight.shape[0])
    with torch.inference_mode():
        got = q.quantized_linear(x, packed, bias)
    exact = x.double() @ weight.double().T + bias.double()
    assert got.shape == exact.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    if x.reshape(-1, x.shape[-1]).shape[0] > q.PRODUCT_ROWS:  # the prefill path: the fp32 model's own numbers
        assert torch.equal(got, F.linear(x, weight, bias))
    if rows > q.PRODUCT_ROWS:  # a batched decode step (one token a row): the product, four rows at a time
        step = torch.randn(rows, 1, weight.shape[1])
        with torch.inference_mode():
            got = q.quantized_linear(step, packed, bias)
        exact = step.double() @ weight.double().T + bias.double()
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
        if q.native.library() is not None:  # each row is what it would be alone
            with torch.inference_mode():
                alone = torch.cat([q.quantized_linear(step[i : i + 1], packed, bias) for i in range(rows)])
            assert torch.equal(got, alone)


def test_product_path_takes_views_with_an_offset():
    raw, weight = _raw("Q4_1")
    packed = q.unpack(raw, "Q4_1")
    whole = torch.randn(3, weight.shape[1])
    with torch.no_grad():
        got = q.quantized_linear(whole[1:2], packed)  # a view starting at element 96
    torch.testing.assert_close(got.double(), whole[1:2].double() @ weight.double().T, rtol=1e-5, atol=1e-5)


def test_unpack_refuses_unknown_formats_and_ragged_data():
    raw, _ = _raw("Q4_1")
    with pytest.raises(ValueError, match="supported: Q4_0, Q4_1, Q8_0"):
        q.unpack(raw, "Q4_K")
    with pytest.raises(ValueError, match=r"\(rows, blocks \* 20\) bytes"):
        q.unpack(raw[:, :-1], "Q4_1")


def test_module_stands_in_for_linear():
    raw, weight = _raw("Q8_0")
    layer = q.QuantizedLinear(q.unpack(raw, "Q8_0"))
    assert (layer.in_features, layer.out_features) == (weight.shape[1], weight.shape[0])
    assert torch.equal(layer.dequantized(), weight) and "format=Q8_0" in repr(layer)
    assert {n for n, _ in layer.named_buffers()} == {"codes", "scale"}  # no offset, no bias: not stored


def test_permuted_rows_are_found_and_a_foreign_weight_is_refused():
    """llama.cpp permutes q/k rows per head; the layer is swapped only with the row order that matches."""

    class Config:
        num_attention_heads, num_key_value_heads = 4, 2

    raw, weight = _raw("Q4_1", rows=32)
    order = hq._row_orders(32, Config)[1]  # one of the permutations undone
    assert sorted(order.tolist()) == list(range(32)) and order.tolist() != list(range(32))
    stored = np.empty_like(raw)
    stored[order] = raw  # what a permuting converter would have written
    found = hq._matching(stored, "Q4_1", weight, Config)
    assert found is not None and torch.equal(q.dequantize(found), weight)
    assert hq._matching(stored, "Q4_1", weight + 1e-3, Config) is None


@pytest.fixture(scope="module")
def fp32_twin():
    """The embedded default with fp32 weights, to compare the (default) quantised model with."""
    import selfextend_llm

    return selfextend_llm.load(quantized_weights=False)


def test_default_model_keeps_its_blocks_and_generates_the_same_tokens(default_model, fp32_twin):
    info = default_model.describe()["quantized_weights"]
    layers = len(default_model.model.model.layers)
    assert info["quantized_layers"] == 7 * layers + 1  # every projection and the (tied) lm head
    assert info["formats"] == {"Q4_1": 7 * layers, "Q8_0": 1} and info["fp32_layers_kept"] == 0
    assert info["weight_mb"]["kept"] < info["weight_mb"]["fp32"] / 3
    assert fp32_twin.describe()["quantized_weights"] is None
    assert isinstance(default_model.model.lm_head, q.QuantizedLinear)
    assert default_model.model.get_input_embeddings().weight.shape[0] == default_model.model.lm_head.out_features
    ids = torch.tensor([default_model.tokenize("The capital of France is Paris. The capital of Italy is")])
    with torch.inference_mode():
        a = default_model.model(ids).logits
        b = fp32_twin.model(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=2e-3)  # prefill: the same fp32 numbers up to kernel order
    for prompt in ["Write a haiku about the sea.", "List three prime numbers and explain why they are prime."]:
        got = default_model.complete(prompt, max_new_tokens=24, temperature=0)
        want = fp32_twin.complete(prompt, max_new_tokens=24, temperature=0)
        assert got.text == want.text and got.completion_tokens == want.completion_tokens


def test_selfextend_past_a_small_window_is_unchanged_by_quantised_weights(default_model, fp32_twin):
    from selfextend_llm.config import SelfExtendConfig

    prompt = ("The grass is green. The sky is blue. The pass key is 41872. Remember it. " * 40) + "The pass key is"
    out = []
    for model in (default_model, fp32_twin):
        ids = torch.tensor([model.tokenize(prompt)])
        model.use_grouping(SelfExtendConfig(4, 128))  # grouping from 128 tokens on: past the window here
        try:
            with torch.inference_mode():
                new = model.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
            out.append(new[0, ids.shape[1] :].tolist())
        finally:
            model.use_grouping(model.plan.config_for(ids.shape[1]))
    assert len(out[0]) == 8 and out[0] == out[1]


def test_block_cache_is_written_once_and_read_back(default_model, tmp_path, monkeypatch):
    from selfextend_llm.loading import blocks_cache, default_gguf_path, load_pretrained

    assert blocks_cache(default_gguf_path()).is_file()  # load() keeps one beside its dequantised folder
    lm, _, _ = load_pretrained(device="cpu", quantized_weights=False)
    cache = tmp_path / "blocks.safetensors"
    first = hq.attach(lm, default_gguf_path(), cache=cache)
    assert cache.is_file() and len(first.swapped) == 211
    lm2, _, _ = load_pretrained(device="cpu", quantized_weights=False)

    def no_reading(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed although its blocks are cached")

    monkeypatch.setattr("gguf.GGUFReader", no_reading)
    second = hq.attach(lm2, default_gguf_path(), cache=cache)
    assert second.swapped == first.swapped
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.equal(lm(ids).logits, lm2(ids).logits)


def test_stale_block_cache_is_replaced(default_model, tmp_path):
    from selfextend_llm.loading import default_gguf_path, load_pretrained

    lm, _, _ = load_pretrained(device="cpu", quantized_weights=False)
    cache = tmp_path / "blocks.safetensors"
    raw, _ = _raw("Q4_1", rows=lm.lm_head.out_features, cols=lm.lm_head.in_features)
    hq._save(cache, {"lm_head": q.unpack(raw, "Q4_1")})  # blocks of some other weight
    result = hq.attach(lm, default_gguf_path(), cache=cache)
    assert len(result.swapped) == 211 and result.swapped["lm_head"] == "Q8_0"
    assert hq._load(cache)["lm_head"].format == "Q8_0"


def test_without_a_working_compiler_the_model_keeps_fp32_with_a_warning(monkeypatch):
    from selfextend_llm.loading import default_gguf_path, load_pretrained

    lm, _, _ = load_pretrained(device="cpu", quantized_weights=False)
    monkeypatch.setattr(q, "kernels_available", lambda: "InductorError: no C++ compiler")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*quantized_weights=False"):
        result = hq.attach(lm, default_gguf_path())
    assert not result.swapped and isinstance(lm.lm_head, torch.nn.Linear)


def test_misuse_says_what_to_change(default_model, tmp_path):
    import transformers

    import selfextend_llm
    from selfextend_llm.loading import default_gguf_path

    with pytest.raises(TypeError, match="True, False or None"):
        selfextend_llm.load(quantized_weights="yes")
    with pytest.raises(ValueError, match="CPU in float32.*dtype='float32'"):
        selfextend_llm.load(quantized_weights=True, dtype="bfloat16")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128,
    )  # fmt: skip
    folder = tmp_path / "tiny"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    default_model.tokenizer.save_pretrained(folder)
    with pytest.raises(ValueError, match="needs a GGUF file"):
        selfextend_llm.load(str(folder), quantized_weights=True)
    assert selfextend_llm.load(str(folder)).describe()["quantized_weights"] is None  # automatic: only for GGUF
    bf16 = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    with pytest.raises(ValueError, match="quantized_weights=False"):
        hq.attach(bf16, default_gguf_path())


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
def test_single_row_kernel_matches_the_generic_path_and_is_kept_per_shape(fmt):
    with native.disabled():  # the Inductor kernel is what runs without the C kernels
        _single_row_kernel_matches(fmt)


def _single_row_kernel_matches(fmt):
    raw, weight = _raw(fmt, rows=40, seed=3)
    packed = q.unpack(raw, fmt)
    layer = q.QuantizedLinear(packed)
    layer.prepare()
    assert layer.one_row is q.one_row_kernel(q.unpack(_raw(fmt, rows=40, seed=4)[0], fmt))  # same shape: reused
    x = torch.randn(1, 1, weight.shape[1])
    with torch.inference_mode():
        got = layer(x)
        generic = q.quantized_linear(x, packed)
    torch.testing.assert_close(got, generic, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), x.double() @ weight.double().T, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # views and other dtypes take the generic path, not the unguarded kernel
        wide = torch.randn(1, 2 * weight.shape[1])
        torch.testing.assert_close(layer(wide[:, weight.shape[1] :]), layer(wide[:, weight.shape[1] :].clone()))
    layer.to(torch.float32)
    assert layer.one_row is None  # moved or cast: back to the guarded path until prepared again


def test_default_model_layers_are_prepared(default_model):
    layers = [m for m in default_model.model.modules() if isinstance(m, q.QuantizedLinear)]
    # With the C kernels no per-shape Inductor kernel is compiled at load (they take the decode calls).
    compiled = native.library() is None
    assert layers and all((m.one_row is not None) == compiled for m in layers)
    kernels = default_model.describe()["cpu_kernels"]
    assert kernels["native_kernels"] is not compiled and (kernels["why_not"] is None) is not compiled
    assert "notes" not in default_model.describe()["quantized_weights"]


def test_required_quantised_weights_that_cannot_be_kept_raise(monkeypatch):
    import selfextend_llm

    monkeypatch.setattr(q, "kernels_available", lambda: "InductorError: no C++ compiler")
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="no layer of .* could keep its GGUF blocks"):
        selfextend_llm.load(quantized_weights=True)
