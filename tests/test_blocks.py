"""The CPU block path (:func:`selfextend_llm.kernels.blocks.block_attention` through ``selfextend_attention``)
against the float64 formula: every key range of a block (grouped bulk, window edge, plain bulk, causal diagonal),
block sizes that do and do not divide the length, a continuing chunk, left padding, custom masks and softcapping."""

from __future__ import annotations

import pytest
import torch

from selfextend_llm.attention import selfextend_attention
from selfextend_llm.reference import reference_selfextend


def _case(seed: int, n: int, q_len: int, heads: int = 4, kv_heads: int = 2, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, q_len, d, generator=g)
    k = torch.randn(2, kv_heads, n, d, generator=g)
    v = torch.randn(2, kv_heads, n, d, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    return q, k, v, inv_freq


@pytest.mark.parametrize("kernel", ["auto", "math"])
@pytest.mark.parametrize(
    ("n", "q_len", "window", "group", "block"),
    [
        (200, 200, 24, 3, 48),  # blocks not dividing the length; all four ranges in late blocks
        (200, 200, 150, 2, 64),  # window wider than a block: early blocks have no grouped part
        (130, 130, 1, 4, 16),  # W=1: only the diagonal's own key is plain
        (260, 60, 32, 5, 32),  # a continuing chunk: queries start at key 200
        (97, 97, 200, 2, 32),  # the window covers everything: exactly plain
    ],
)
def test_block_path_matches_the_float64_formula(kernel, n, q_len, window, group, block):
    q, k, v, inv_freq = _case(n + q_len + window, n, q_len)
    start = n - q_len
    qpos = torch.arange(start, n)[None].expand(2, -1)
    out, _ = selfextend_attention(
        q, k, v, query_positions=qpos, query_start=start, group_size=group, neighbor_window=window,
        inv_freq=inv_freq.float(), scale=0.25, block_size=block, backend=kernel if kernel == "math" else "auto",
    )  # fmt: skip
    ref = reference_selfextend(
        q, k, v, query_positions=qpos, key_positions=torch.arange(n)[None], group_size=group,
        neighbor_window=window, inv_freq=inv_freq, scale=0.25, rotated=True,
    )  # fmt: skip
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [20, 40])  # narrower and wider than the 32-row blocks
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_block_path_with_left_padding_a_custom_mask_and_softcap(softcap, window):
    n, group = 150, 3
    q, k, v, inv_freq = _case(7, n, n)
    pad = torch.tensor([0, 11])  # row 1 starts with 11 padding slots
    key_valid = torch.arange(n)[None] >= pad[:, None]
    qpos = (torch.arange(n)[None] - pad[:, None]).clamp(min=0)
    kpos = qpos
    causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    holes = torch.rand(1, 1, n, n, generator=torch.Generator().manual_seed(3)) > 0.2  # an arbitrary extra mask
    holes |= torch.eye(n, dtype=torch.bool)  # every row keeps its own key
    out, _ = selfextend_attention(
        q, k, v, query_positions=qpos, query_start=0, group_size=group, neighbor_window=window,
        inv_freq=inv_freq.float(), scale=0.25, key_valid=key_valid, full_mask=holes, softcap=softcap, block_size=32,
    )  # fmt: skip
    mask = (causal[None, None] & holes & key_valid[:, None, None, :]).expand(2, 1, n, n)
    ref = reference_selfextend(
        q, k, v, query_positions=qpos, key_positions=kpos, group_size=group, neighbor_window=window,
        inv_freq=inv_freq, scale=0.25, mask=mask, softcap=softcap,
    )  # fmt: skip
    real = key_valid[:, None, :, None].expand_as(out)  # padding rows' outputs are not used by anyone
    torch.testing.assert_close(out.double()[real], ref[real], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(("n", "q_len", "kernel"), [(200, 200, "auto"), (200, 200, "math"), (201, 1, "auto")])
def test_log_scaled_queries_at_any_strength_are_the_formula_on_scaled_queries(strength, n, q_len, kernel):
    """A prefill and a decode step (the explicit CPU path) with log scaling at ``strength`` past a trained
    window of 64: the float64 formula on queries multiplied by ``1 + strength * (log(pos + 1) / log(64) - 1)``."""
    import math

    from selfextend_llm.config import LogScale

    q, k, v, inv_freq = _case(int(10 * strength) + q_len, n, q_len)
    start = n - q_len
    qpos = torch.arange(start, n)[None].expand(2, -1)
    out, _ = selfextend_attention(
        q, k, v, query_positions=qpos, query_start=start, group_size=4, neighbor_window=24,
        inv_freq=inv_freq.float(), scale=0.25, log_scaling=LogScale(64, strength),
        backend=kernel if kernel == "math" else "auto",
    )  # fmt: skip
    factor = torch.tensor([max(1.0, 1 + strength * (math.log(p + 1) / math.log(64) - 1)) for p in range(start, n)])
    assert factor.max() > 1.1  # the scaling is in play for the late queries
    ref = reference_selfextend(
        q.double() * factor[None, None, :, None], k, v, query_positions=qpos, key_positions=torch.arange(n)[None],
        group_size=4, neighbor_window=24, inv_freq=inv_freq, scale=0.25, rotated=True,
    )  # fmt: skip
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
