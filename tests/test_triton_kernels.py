"""The fused Triton kernels against the float64 formula, kernel by kernel and inside a model.

On a machine without a GPU they run in Triton's interpreter (exact, slow: shapes stay small);
with ``SELFEXTEND_TEST_DEVICE=cuda`` the same tests run the compiled kernels, also in half precision.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import selfextend_llm as se
from selfextend_llm.kernels import triton as tk
from selfextend_llm.reference import reference_selfextend
from selfextend_llm.rope import rotate

DEVICE = torch.get_default_device()
pytestmark = pytest.mark.skipif(not tk.available(DEVICE), reason="needs Triton (CUDA, or TRITON_INTERPRET=1)")
ON_GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if ON_GPU else [torch.float32]
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _inputs(b, h, kvh, n, q_len, d, dtype, pads, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEVICE).float() / d))
    q = torch.randn(b, h, q_len, d, generator=g, device=DEVICE)
    k = torch.randn(b, kvh, n, d, generator=g, device=DEVICE)
    v = torch.randn(b, kvh, n, d, generator=g, device=DEVICE)
    offsets = torch.tensor(pads, device=DEVICE)
    k_pos = torch.arange(n, device=DEVICE)[None] - offsets[:, None]
    q_pos = k_pos[:, n - q_len :]
    q, k = rotate(q, q_pos, inv), rotate(k, k_pos, inv)
    return q.to(dtype), k.to(dtype), v.to(dtype), inv, offsets, q_pos, k_pos


def _check(out, q, k, v, inv, q_pos, k_pos, G, W, padded, dtype):
    valid = (k_pos >= 0) if padded else None
    mask = (q_pos[:, :, None] >= k_pos[:, None, :])[:, None]
    if valid is not None:
        mask = mask & valid[:, None, None, :]
    ref = reference_selfextend(
        q, k, v, query_positions=q_pos, key_positions=k_pos, group_size=G, neighbor_window=W,
        inv_freq=inv, scale=q.shape[-1] ** -0.5, mask=mask,
    )  # fmt: skip
    keep = (q_pos >= 0)[:, None, :, None]  # rows of padding tokens are don't-care
    err = ((out.double() - ref) * keep).abs().max().item()
    assert err < TOL[dtype], f"max abs error {err:.2e}"
    # the grouped part really mattered: plain causal attention differs by far more
    plain = reference_selfextend(
        q, k, v, query_positions=q_pos, key_positions=k_pos, group_size=1, neighbor_window=W,
        inv_freq=inv, scale=q.shape[-1] ** -0.5, mask=mask,
    )  # fmt: skip
    if W < q_pos.max() and G > 1:
        assert ((plain - ref) * keep).abs().max().item() > 5 * max(err, TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("b", "h", "kvh", "n", "q_len", "d", "G", "W", "pads"),
    [
        (1, 4, 2, 150, 150, 32, 3, 20, [0]),  # GQA, length not a block multiple
        (1, 2, 2, 130, 130, 64, 4, 9, [0]),  # window smaller than a block: grouped keys on the diagonal
        (1, 3, 1, 140, 37, 32, 5, 24, [0]),  # a later chunk of a prefill (queries start at 103)
        (2, 4, 2, 120, 120, 32, 3, 25, [0, 17]),  # left-padded batch
        (1, 2, 1, 90, 90, 32, 1, 16, [0]),  # G=1 is plain attention
        (1, 2, 1, 90, 90, 32, 6, 200, [0]),  # window beyond the sequence is plain attention
    ],
)
def test_prefill_matches_formula(b, h, kvh, n, q_len, d, G, W, pads, dtype):
    q, k, v, inv, off, q_pos, k_pos = _inputs(b, h, kvh, n, q_len, d, dtype, pads)
    out = tk.prefill(
        q, k, v, offsets=off, query_start=n - q_len, group_size=G, neighbor_window=W, inv_freq=inv,
        scale=d**-0.5, key_valid=(k_pos >= 0) if any(pads) else None,
    )  # fmt: skip
    _check(out, q, k, v, inv, q_pos, k_pos, G, W, any(pads), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("b", "h", "kvh", "n", "d", "G", "W", "start"),
    [
        (1, 4, 2, 150, 32, 3, 20, [0]),  # GQA, length not a block multiple
        (1, 2, 2, 130, 64, 4, 9, [0]),  # window smaller than a block
        (1, 9, 3, 200, 64, 8, 64, [0]),  # SmolLM2's head layout
        (2, 4, 2, 120, 32, 3, 25, [0, 7]),  # a batch; the second row's positions start at 7
        (1, 2, 1, 90, 32, 1, 16, [0]),  # G=1 is plain attention
        (1, 2, 1, 90, 32, 6, 200, [0]),  # window beyond the sequence: no grouped part at all
        (1, 2, 1, 41, 32, 3, 40, [0]),  # one row with one grouped key
    ],
)
def test_split_prefill_matches_formula(b, h, kvh, n, d, G, W, start, dtype):
    """Grouped part through the fused causal SDPA kernel, neighbor band in Triton, merged in-kernel."""
    q, k, v, inv, off, q_pos, k_pos = _inputs(b, h, kvh, n, n, d, dtype, [-s for s in start])
    out = tk.prefill_split(q, k, v, offsets=off, group_size=G, neighbor_window=W, inv_freq=inv, scale=d**-0.5)
    _check(out, q, k, v, inv, q_pos, k_pos, G, W, False, dtype)


def test_rotation_kernel_matches_rope_rotate():
    """The grouped re-rotation kernel (float64 angles) against :func:`rope.rotate`, queries and keys."""
    from selfextend_llm.rope import grouped_key_position, grouped_query_position

    x = torch.randn(2, 3, 70, 32, device=DEVICE)
    inv = 1.0 / (10000 ** (torch.arange(0, 32, 2, device=DEVICE).float() / 32))
    off = torch.tensor([0, 5], device=DEVICE)
    pos = 40 + torch.arange(70, device=DEVICE)[None] - off[:, None]  # rows start at cache index 40
    for queries, target in ((False, grouped_key_position(pos, 3)), (True, grouped_query_position(pos, 3, 8))):
        got = tk.rotate_to_groups(x, off, index0=40, group_size=3, neighbor_window=8, inv_freq=inv, queries=queries)
        assert torch.allclose(got, rotate(x, target - pos, inv), atol=1e-5)
    # queries and keys (fewer heads, other cache indices) in one launch, as the split prefill does
    k = torch.randn(2, 1, 70, 32, device=DEVICE)
    k_pos = torch.arange(70, device=DEVICE)[None] - off[:, None]
    got_q, got_k = tk.rotate_to_groups(
        x, off, index0=40, group_size=3, neighbor_window=8, inv_freq=inv, queries=True, keys=k, keys_index0=0
    )
    assert torch.allclose(got_q, rotate(x, grouped_query_position(pos, 3, 8) - pos, inv), atol=1e-5)
    assert torch.allclose(got_k, rotate(k, grouped_key_position(k_pos, 3) - k_pos, inv), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("b", "h", "kvh", "n", "d", "G", "W", "pads"),
    [
        (1, 4, 2, 200, 32, 3, 20, [0]),
        (1, 9, 3, 333, 64, 8, 64, [0]),  # SmolLM2's head layout: 3 query heads per KV head
        (2, 6, 2, 170, 32, 3, 20, [0, 33]),  # padded batch
        (1, 2, 1, 10, 32, 3, 30, [0]),  # all keys inside the window
    ],
)
def test_decode_matches_formula(b, h, kvh, n, d, G, W, pads, dtype):
    q, k, v, inv, off, q_pos, k_pos = _inputs(b, h, kvh, n, 1, d, dtype, pads)
    for splits in (None, 1, 3):
        out = tk.decode(
            q, k, v, offsets=off, group_size=G, neighbor_window=W, inv_freq=inv, scale=d**-0.5,
            key_valid=(k_pos >= 0) if any(pads) else None, splits=splits,
        )  # fmt: skip
        _check(out, q, k, v, inv, q_pos, k_pos, G, W, any(pads), dtype)


def test_decode_merges_more_splits_than_one_merge_tile():
    """More splits than the merge kernel reads at once (it loops, so one compile serves every split count)."""
    from selfextend_llm.kernels.triton.decode import MERGE_SPLITS

    q, k, v, inv, off, q_pos, k_pos = _inputs(1, 2, 1, 16 * (MERGE_SPLITS + 5) + 3, 1, 32, torch.float32, [0])
    out = tk.decode(
        q, k, v, offsets=off, group_size=4, neighbor_window=40, inv_freq=inv, scale=32**-0.5, block_n=16,
        splits=MERGE_SPLITS + 6,
    )  # fmt: skip
    _check(out, q, k, v, inv, q_pos, k_pos, 4, 40, False, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_static_cache_decode_reads_lengths_from_a_tensor(dtype):
    """A static cache: 300 slots, rows ending at different slots, garbage past each row's end.
    With ``lengths`` the kernel equals decoding the row's own keys; the custom op (what compiled
    steps call) gives the same."""
    from selfextend_llm.kernels.static_decode import triton_static_decode

    b, h, kvh, n, d, G, W = 2, 6, 2, 300, 32, 3, 20
    ends, pads = [170, 233], [0, 41]
    q, k, v, inv, _, _, _ = _inputs(b, h, kvh, n, 1, d, dtype, [0, 0], seed=3)
    for row, (end, pad) in enumerate(zip(ends, pads, strict=True)):
        qr, kr, vr, _, _, _, _ = _inputs(1, h, kvh, end, 1, d, dtype, [pad], seed=10 + row)
        q[row], k[row, :, :end], v[row, :, :end] = qr[0], kr[0], vr[0]
    slots = torch.arange(n, device=DEVICE)
    lengths = torch.tensor(ends, device=DEVICE)
    offsets = torch.tensor(pads, device=DEVICE)
    valid = (slots[None] < lengths[:, None]) & (slots[None] >= offsets[:, None])
    args = dict(offsets=offsets, group_size=G, neighbor_window=W, inv_freq=inv, scale=d**-0.5)
    out = tk.decode(q, k, v, key_valid=valid, lengths=lengths, splits=4, **args)
    op = triton_static_decode(q, k, v, offsets, lengths, valid, inv, G, W, d**-0.5)
    for row, end in enumerate(ends):
        alone = tk.decode(
            q[row : row + 1], k[row : row + 1, :, :end], v[row : row + 1, :, :end], offsets=offsets[row : row + 1],
            group_size=G, neighbor_window=W, inv_freq=inv, scale=d**-0.5, key_valid=valid[row : row + 1, :end],
        )  # fmt: skip
        assert torch.allclose(out[row], alone[0], atol=TOL[dtype]), (out[row] - alone[0]).abs().max()
        assert torch.allclose(op[row], alone[0], atol=TOL[dtype])


def test_unsupported_shapes_are_refused_or_fall_back():
    assert not tk.supports(64, 32, "half", torch.float32)  # partial rotary
    assert not tk.supports(64, 64, "interleaved", torch.float32)
    assert not tk.supports(80, 80, "half", torch.float32)
    q = torch.randn(1, 2, 8, 64).transpose(-1, -2)  # head dim not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        tk.prefill(q, q, q, offsets=torch.zeros(1), query_start=0, group_size=2, neighbor_window=4,
                   inv_freq=torch.ones(4), scale=1.0)  # fmt: skip
    q, k, v, inv, off, q_pos, _ = _inputs(1, 3, 2, 40, 40, 32, torch.float32, [0])
    args = dict(offsets=off, query_start=0, group_size=2, neighbor_window=4, inv_freq=inv, scale=1.0)
    with pytest.raises(ValueError, match="not a multiple of 2 KV heads"):
        tk.prefill(q, k, v, **args)
    q, k, v, inv, off, q_pos, _ = _inputs(1, 4, 2, 40, 40, 32, torch.float32, [0])
    with pytest.raises(ValueError, match="do not match keys"):
        tk.prefill(q, k, v, k[:, :, :30], **args)


def test_forcing_the_triton_backend_where_it_cannot_run_says_what_to_change():
    from selfextend_llm.attention import selfextend_attention

    q, k, v, inv, off, q_pos, _ = _inputs(1, 4, 2, 40, 40, 32, torch.float32, [0])
    with pytest.raises(ValueError, match="backend 'triton' needs .* no softcapping"):
        selfextend_attention(
            q, k, v, query_positions=q_pos, query_start=0, group_size=2, neighbor_window=8, inv_freq=inv,
            scale=0.2, softcap=30.0, backend="triton",
        )  # fmt: skip


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("backend", ["triton", "split"])
def test_model_with_triton_backend_matches_reference(backend):
    """Prefill, decode steps and a padded batch through transformers, on the GPU kernels."""
    model = _tiny_llama()
    se.apply(model, se.SelfExtendConfig(4, 16))
    model._selfextend_settings.backend = backend
    a, b = torch.randint(1, 97, (1, 140)), torch.randint(1, 97, (1, 100))
    pad = a.shape[1] - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits.double()
        # prefill 120 tokens, then decode one token at a time on the cache
        out = model(ids[:, :120], attention_mask=mask[:, :120], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(120, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        model.set_attn_implementation("selfextend_reference")
        ref = model(ids, attention_mask=mask).logits.double()
    tol = 2e-4
    assert (full[0] - ref[0]).abs().max() < tol
    assert (full[1, pad:] - ref[1, pad:]).abs().max() < tol
    stepped = torch.cat(steps, 1).double()
    assert (stepped[0] - ref[0]).abs().max() < tol
    assert (stepped[1, pad:] - ref[1, pad:]).abs().max() < tol


def test_kernel_that_does_not_fit_falls_back_with_a_warning(monkeypatch):
    """A GPU whose shared memory cannot hold the tiles for some shape gets the other path, not a crash."""
    from selfextend_llm import attention

    q, k, v, inv, off, q_pos, _ = _inputs(1, 4, 2, 150, 150, 32, torch.float32, [0])

    def too_big(*args, **kwargs):
        raise tk.OutOfResources(300000, 232448, "shared memory")

    def as_on_a_gpu(backend, query, inv_freq, layout, full_mask, softcap):
        return tk.supports(query.shape[-1], 2 * inv_freq.shape[-1], layout, query.dtype)

    monkeypatch.setattr(attention, "_triton_fits", as_on_a_gpu)
    monkeypatch.setattr(tk, "prefill", too_big)
    monkeypatch.setattr(tk, "prefill_split", too_big)
    monkeypatch.setattr(tk, "DISABLED", set())
    kwargs = dict(query_positions=q_pos, query_start=0, group_size=3, neighbor_window=20, inv_freq=inv, scale=0.2)
    with pytest.warns(UserWarning, match="do not fit"):
        out, _ = attention.selfextend_attention(q, k, v, **kwargs)
    expected, _ = attention.selfextend_attention(q, k, v, backend="math", **kwargs)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not tk.supports(32, 32, "half", torch.float32)  # remembered: no second failing launch


def test_split_prefill_without_a_fused_causal_kernel_takes_the_one_pass_kernel(monkeypatch):
    """Where neither cuDNN nor FlashAttention-2 runs and explicit scores would be too big, the split
    prefill steps aside for the one-pass kernel instead of building an n x n matrix."""
    from selfextend_llm import attention
    from selfextend_llm.kernels import lse

    q, k, v, inv, off, q_pos, _ = _inputs(1, 4, 2, 150, 150, 32, torch.float32, [0])
    kwargs = dict(query_positions=q_pos, query_start=0, group_size=3, neighbor_window=20, inv_freq=inv, scale=0.2)
    expected, _ = attention.selfextend_attention(q, k, v, backend="math", **kwargs)
    monkeypatch.setattr(lse, "MATH_FALLBACK_BYTES", 0)
    with pytest.raises(lse.NoFusedCausalKernel, match="too large"):
        tk.prefill_split(q, k, v, offsets=off, group_size=3, neighbor_window=20, inv_freq=inv, scale=0.2)
    out, _ = attention.selfextend_attention(q, k, v, backend="split", **kwargs)
    assert torch.allclose(out, expected, atol=1e-5)
