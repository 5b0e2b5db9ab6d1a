"""The CPU's C kernels (:mod:`selfextend_llm.kernels.native`): the decode step and the quantised product.

Both against float64, against the PyTorch paths they stand in for, on the shapes a static cache hands them (a
slice of a longer buffer, padding, a batch), and what happens without a compiler: the PyTorch path, with the
reason recorded.  Skipped where no C compiler is installed (the fallback test still runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from selfextend_llm.kernels import blocks, native
from selfextend_llm.kernels import quantized as q
from selfextend_llm.kernels.native import decode as nd
from selfextend_llm.kernels.native import quantized as nq

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")


def _reference(query, grouped_query, key, grouped_key, value, boundary, key_valid, scale):
    """The decode step in float64: grouped scores before ``boundary``, plain after, one softmax."""
    b, h, _, d = query.shape
    kv = key.shape[1]
    rows = (b, kv, h // kv, d)
    far = grouped_query.double().reshape(rows) @ grouped_key[:, :, :boundary].double().transpose(-1, -2)
    near = query.double().reshape(rows) @ key[:, :, boundary:].double().transpose(-1, -2)
    scores = torch.cat((far, near), -1) * scale
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, : key.shape[2]], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs @ value.double()).reshape(b, h, 1, value.shape[-1])


def _cache(batch=2, kv_heads=3, heads=9, slots=700, used=613, dim=64, seed=0):
    """Tensors as a static cache hands them over: the used part of longer buffers (a strided view)."""
    g = torch.Generator().manual_seed(seed)
    key, value, grouped = (torch.randn(batch, kv_heads, slots, dim, generator=g) for _ in range(3))
    query, grouped_query = (torch.randn(batch, heads, 1, dim, generator=g) for _ in range(2))
    return query, grouped_query, key[:, :, :used], grouped, value[:, :, :used]


@needs_compiler
@pytest.mark.parametrize("boundary", [0, 1, 300, 613])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_step_matches_float64(boundary, padded):
    query, grouped_query, key, grouped, value = _cache()
    valid = None
    if padded:
        valid = torch.ones(2, 700, dtype=torch.bool)
        valid[1, :250] = False  # left padding in the second row
    got = nd.decode_attention(query, grouped_query, key, grouped, value, boundary, valid, 0.125)
    assert got is not None and got.shape == (2, 9, 1, 64)
    want = _reference(query, grouped_query, key, grouped, value, boundary, valid, 0.125)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("dim, heads, kv_heads", [(80, 4, 4), (128, 8, 2), (64, 5, 1)])
def test_decode_step_other_shapes(dim, heads, kv_heads):
    """Head dims that are not a power of two, no GQA, one KV head for all; more keys than any chunk."""
    query, grouped_query, key, grouped, value = _cache(1, kv_heads, heads, 3000, 2999, dim, seed=1)
    got = nd.decode_attention(query, grouped_query, key, grouped, value, 1500, None, dim**-0.5)
    want = _reference(query, grouped_query, key, grouped, value, 1500, None, dim**-0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@needs_compiler
def test_a_row_of_padding_only_gives_zeros():
    query, grouped_query, key, grouped, value = _cache()
    valid = torch.ones(2, 700, dtype=torch.bool)
    valid[0] = False
    got = nd.decode_attention(query, grouped_query, key, grouped, value, 100, valid, 0.125)
    assert torch.equal(got[0], torch.zeros_like(got[0])) and got[1].abs().sum() > 0


@needs_compiler
def test_explicit_decode_runs_the_kernels_and_falls_back_to_the_same_numbers():
    args = (*_cache(), 300, None, 0.125)
    with torch.inference_mode():
        fast = blocks.decode_explicit(*args)
        assert torch.equal(fast, nd.decode_attention(*args))  # the C kernels ran
        with native.disabled():
            assert nd.decode_attention(*args) is None
            slow = blocks.decode_explicit(*args)
        assert native.library() is not None  # back on after the block
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


@needs_compiler
def test_decode_step_declines_what_it_cannot_take():
    query, grouped_query, key, grouped, value = _cache()
    assert nd.decode_attention(query.bfloat16(), grouped_query, key, grouped, value, 0, None, 0.1) is None
    with torch.enable_grad():
        needs_grad = query.clone().requires_grad_()
        assert nd.decode_attention(needs_grad, grouped_query, key, grouped, value, 0, None, 0.1) is None
    rows_apart = key.transpose(2, 3).contiguous().transpose(2, 3)  # rows not contiguous
    assert nd.decode_attention(query, grouped_query, rows_apart, grouped, value, 0, None, 0.1) is None
    assert nd.decode_attention(query, grouped_query, key, grouped[:, :, :10], value, 300, None, 0.1) is None


def _weight(fmt: str, rows: int, cols: int, seed: int = 0) -> tuple[q.QuantizedWeight, torch.Tensor]:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    raw = gguf_quantize(w, GGMLQuantizationType[fmt])
    dense = torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType[fmt]).reshape(rows, cols).astype(np.float32))
    return q.unpack(raw, fmt), dense


@needs_compiler
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 4, 7, nq.MAX_ROWS])
def test_quantised_product_matches_float64_and_the_inductor_kernel(fmt, rows):
    weight, dense = _weight(fmt, 200, 576)
    x = torch.randn(rows, 576)
    got = nq.product(x, weight)
    assert got is not None and got.shape == (rows, 200)
    torch.testing.assert_close(got.double(), x.double() @ dense.double().T, rtol=1e-5, atol=1e-4)
    compiled = q._compiled(f"_product_{q.variant(weight.codes, weight.offset)}")
    torch.testing.assert_close(got, compiled(x, *q._arguments(weight)), rtol=1e-5, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [5, 16, 30])
def test_many_rows_in_one_call_are_bit_for_bit_four_rows_a_call(fmt, rows):
    """A batched decode step's rows go in one call (each output's codes read once for all of them); every row's
    numbers are the ones it gets four rows a call, so a row's greedy tokens do not depend on its batch."""
    weight, _ = _weight(fmt, 300, 1536, seed=rows)
    x = torch.randn(rows, 1536)
    whole = nq.product(x, weight)
    parts = torch.cat([nq.product(x[i : i + 4].contiguous(), weight) for i in range(0, rows, 4)])
    alone = torch.cat([nq.product(x[i : i + 1].contiguous(), weight) for i in range(rows)])
    assert torch.equal(whole, parts) and torch.equal(whole, alone)


@needs_compiler
def test_quantised_product_wide_input_and_what_it_declines():
    weight, dense = _weight("Q4_1", 8, 32 * 1100)  # more blocks than the kernel keeps input sums for
    x = torch.randn(1, 32 * 1100)
    torch.testing.assert_close(nq.product(x, weight).double(), x.double() @ dense.double().T, rtol=1e-5, atol=1e-3)
    assert nq.product(torch.randn(nq.MAX_ROWS + 1, 32 * 1100), weight) is None  # prefill: dequantise instead
    assert nq.product(x.bfloat16(), weight) is None
    assert nq.product(torch.randn(1, 2 * 32 * 1100)[:, ::2], weight) is None  # not contiguous


def test_without_a_compiler_everything_falls_back_and_says_why(monkeypatch):
    monkeypatch.setattr(native, "compiler", lambda: None)
    native.reset()
    try:
        assert native.library() is None
        assert "no C compiler" in native.unavailable()
        assert native.describe()["native_kernels"] is False
        args = (*_cache(), 300, None, 0.125)
        assert nd.decode_attention(*args) is None
        torch.testing.assert_close(blocks.decode_explicit(*args).double(), _reference(*args), rtol=1e-5, atol=1e-6)
        weight, dense = _weight("Q4_1", 16, 64)
        x = torch.randn(1, 64)
        want = x.double() @ dense.double().T
        torch.testing.assert_close(q.quantized_linear(x, weight).double(), want, rtol=1e-5, atol=1e-5)
    finally:
        monkeypatch.undo()
        native.reset()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    native.reset()
    try:
        assert native.library() is None and native.ENV_SWITCH in native.unavailable()
    finally:
        monkeypatch.undo()
        native.reset()


@needs_compiler
def test_a_build_is_cached_and_reused(tmp_path):
    first, flags = native._build(native.compiler(), tmp_path)
    stamp = first.stat().st_mtime_ns
    again, _ = native._build(native.compiler(), tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp and "-O3" in flags
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left behind


@needs_compiler
@pytest.mark.parametrize(
    "isa", [["-mavx512f", "-mavx512bw", "-mfma"], ["-mavx2", "-mfma"], []], ids=["avx512", "avx2", "portable"]
)
def test_every_branch_of_the_4bit_product_matches_float64(isa, tmp_path):
    """``common.h``'s ``quant_dot_q4`` has an AVX-512, an AVX2 and a plain C branch, chosen by the flags: each
    built on its own (the machine's build takes only one) and run where this CPU can."""
    import ctypes
    import platform
    import subprocess
    from pathlib import Path

    if platform.machine() not in ("x86_64", "AMD64") and isa:
        pytest.skip("x86 vector branches")
    flags = Path("/proc/cpuinfo").read_text() if platform.system() == "Linux" else ""
    if "-mavx512bw" in isa and "avx512bw" not in flags or "-mavx2" in isa and "avx2" not in flags:
        pytest.skip("this CPU lacks the instructions")
    source = Path(native.__file__).parent / "quantized.c"
    built = tmp_path / "q.so"
    run = subprocess.run(
        [native.compiler(), *native.OPTIMISE, *isa, str(source), "-o", str(built)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lib = ctypes.CDLL(str(built))
    lib.se_product_q4.argtypes = native.SIGNATURES["se_product_q4"]
    for fmt in ("Q4_0", "Q4_1"):
        weight, dense = _weight(fmt, 70, 576, seed=3)
        for rows in (1, 3):
            x = torch.randn(rows, 576)
            out = torch.empty(rows, 70)
            offset = None if weight.offset is None else weight.offset.data_ptr()
            pointers = (weight.codes.data_ptr(), weight.scale.data_ptr(), offset, x.data_ptr(), out.data_ptr())
            lib.se_product_q4(rows, 70, 18, *pointers, 64, 1)
            torch.testing.assert_close(out.double(), x.double() @ dense.double().T, rtol=1e-5, atol=1e-4)
