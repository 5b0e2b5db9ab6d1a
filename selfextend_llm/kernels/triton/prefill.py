"""The one-pass SelfExtend prefill: both score kinds in one online softmax.

Prefill chunks, padded batches and float32 take this kernel (a whole unpadded half-precision
prefill takes :mod:`.split_prefill`).  Each program owns a tile of queries and walks the key
blocks in the four ranges of :func:`.utils.attn_fwd_inner`, so each query meets each key once
(twice only on the blocks straddling the window edge), as in one causal flash attention, with
no log-sum-exp merge and no partial outputs.  The grouped rotation of the query tile
(``p // G + W - W // G - p``) is applied in registers to the already-rotated states with the
model's ``inv_freq``; keys are read pre-rotated to ``p // G`` (:func:`.rotate.rotate_keys_to_groups`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rotate import rotate_keys_to_groups
from .utils import (
    BOTH,
    CAUSAL,
    GROUPED,
    HIDDEN,
    LOG2E,
    PLAIN,
    attn_fwd_inner,
    band_ranges,
    cdiv,
    check_inputs,
    launch_blocks,
    load_queries,
    on_query_device,
    precision,
    rope_args,
    valid_arg,
)


@triton.jit(do_not_specialize=["q_len", "q_start"])  # lengths: one compile, not one per divisibility
def _prefill_kernel(
    Q,
    K,
    KG,
    V,
    OUT,
    INV,
    OFF,
    VALID,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kgb,
    stride_kgh,
    stride_kgn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_valid_b,
    n_heads,
    q_len,
    q_start,
    G,
    W,
    qk_scale,
    HEADS_PER_KV: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIAG: tl.constexpr,
    HAS_VALID: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kvh = h // HEADS_PER_KV
    off_b = tl.load(OFF + b)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    i_idx = q_start + rows
    d = tl.arange(0, HALF)
    q_ptr = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + d[None, :]
    q1, q2, qg1, qg2, inv = load_queries(q_ptr, row_ok, i_idx - off_b, INV, G, W, HALF)

    m_i = tl.full([BLOCK_M], HIDDEN, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, 2 * HALF], dtype=tl.float32)

    k_off = K + b * stride_kb + kvh * stride_kh
    kg_off = KG + b * stride_kgb + kvh * stride_kgh
    v_off = V + b * stride_vb + kvh * stride_vh
    valid_off = VALID + b * stride_valid_b
    first = q_start + pid_m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, q_start + q_len) - 1
    edge_start, mid_start, diag_start, end = band_ranges(first, last, W, BLOCK_N)
    acc, m_i, l_i = attn_fwd_inner(
        acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, k_off, kg_off, v_off, valid_off, inv, off_b,
        0, edge_start, mid_start, diag_start, end, stride_kn, stride_kgn, stride_vn, G, W, qk_scale,
        k_off, 1, 0, 0, HALF, BLOCK_N, GROUPED, BOTH, PLAIN, DIAG, HAS_VALID, PREC, False, False, False,
    )  # fmt: skip
    seen = m_i > HIDDEN / 2
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out = tl.where(seen[:, None], out, 0.0)
    o_ptr = OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + tl.arange(0, 2 * HALF)[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


@on_query_device
def prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    grouped_key: torch.Tensor | None = None,
    *,
    offsets: torch.Tensor,
    query_start: int,
    group_size: int,
    neighbor_window: int,
    inv_freq: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """SelfExtend attention of ``query`` (``b, h, q, d``) over ``key``/``value`` (``b, kv_h, n, d``).

    Query row ``t`` sits at cache index ``query_start + t`` and sees keys up to its own index.
    ``offsets`` (``b``) is each row's cache index minus RoPE position (left padding);
    ``key_valid`` (``b, n``) marks real keys.
    """
    if grouped_key is None:
        grouped_key = rotate_keys_to_groups(key, offsets, group_size, inv_freq)
    check_inputs(query, key, value, grouped_key)
    bsz, heads, q_len, dim = query.shape
    out = torch.empty_like(query)
    if q_len == 0:
        return out
    bm, bn, warps, stages = launch_blocks(dim, query.dtype, block_m, block_n, num_warps, num_stages)
    valid, valid_stride, has_valid = valid_arg(key_valid, query)
    inv, off = rope_args(inv_freq, offsets, query.device)
    grid = (cdiv(q_len, bm), bsz * heads)
    _prefill_kernel[grid](
        query, key, grouped_key, value, out, inv, off, valid,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        grouped_key.stride(0), grouped_key.stride(1), grouped_key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        valid_stride, heads, q_len, query_start, group_size, neighbor_window, scale * LOG2E.value,
        HEADS_PER_KV=heads // key.shape[1], HALF=dim // 2, BLOCK_M=bm, BLOCK_N=bn,
        DIAG=(BOTH if neighbor_window < bm + bn else CAUSAL).value, HAS_VALID=has_valid, PREC=precision(query.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
