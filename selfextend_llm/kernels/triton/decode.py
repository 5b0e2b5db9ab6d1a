"""Decoding one token: a split-K ("flash-decoding") SelfExtend kernel and its merge.

The query heads that share a KV head are packed into one tile, the cache is cut into splits
processed in parallel, and a second small kernel merges the splits (one softmax over all of
them).  Each key is met once per step, so its grouped rotation is done in registers and no
grouped copy of the cache is kept.  A static cache passes each row's length as a tensor, so a
step has no host sync and replays in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreted
from .utils import (
    BOTH,
    CAUSAL,
    GROUPED,
    HIDDEN,
    LOG2E,
    SKIP,
    attn_fwd_inner,
    cdiv,
    check_inputs,
    load_queries,
    next_pow2,
    on_query_device,
    precision,
    rope_args,
    sm_count,
    valid_arg,
)


@triton.jit(do_not_specialize=["n_keys", "split_len", "n_splits"])  # lengths: one compile, not one per divisibility
def _decode_kernel(
    Q,
    K,
    V,
    O_PART,
    M_PART,
    L_PART,
    INV,
    OFF,
    VALID,
    LENGTHS,
    BT,
    stride_btb,
    PAGE,
    stride_kblk,
    stride_vblk,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_valid_b,
    n_kv_heads,
    n_keys,
    split_len,
    n_splits,
    G,
    W,
    qk_scale,
    HEADS_PER_KV: tl.constexpr,
    ROWS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    PREC: tl.constexpr,
    FAST: tl.constexpr,
    PAGED: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bk // n_kv_heads
    kvh = pid_bk % n_kv_heads
    off_b = tl.load(OFF + b)
    if HAS_LENGTHS:
        # a static cache: the row's keys end at its query's slot, not at the buffer's end
        n_keys = tl.load(LENGTHS + b)

    r = tl.arange(0, ROWS)
    row_ok = r < HEADS_PER_KV
    h = kvh * HEADS_PER_KV + r
    d = tl.arange(0, HALF)
    q_ptr = Q + b * stride_qb + h[:, None] * stride_qh + d[None, :]
    i_idx = tl.zeros([ROWS], dtype=tl.int32) + (n_keys - 1)
    q1, q2, qg1, qg2, inv = load_queries(q_ptr, row_ok, i_idx - off_b, INV, G, W, HALF)

    m_i = tl.full([ROWS], HIDDEN, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, 2 * HALF], dtype=tl.float32)
    k_off = K + b * stride_kb + kvh * stride_kh
    v_off = V + b * stride_vb + kvh * stride_vh
    valid_off = VALID + b * stride_valid_b
    bt_off = BT + b * stride_btb  # PAGED: this row's block table (K/V then point at the whole cache)

    lo = split * split_len
    hi = tl.minimum(lo + split_len, n_keys)
    # Keys before g_lim are all grouped for the single query; the block holding g_lim straddles.
    g_lim = tl.maximum(n_keys - W, 0)
    edge_start = tl.minimum(tl.maximum((g_lim // BLOCK_N) * BLOCK_N, lo), hi)
    diag_start = tl.minimum(tl.maximum(((g_lim + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, edge_start), hi)
    acc, m_i, l_i = attn_fwd_inner(
        acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, k_off, k_off, v_off, valid_off, inv, off_b,
        lo, edge_start, diag_start, diag_start, hi, stride_kn, stride_kn, stride_vn, G, W, qk_scale,
        bt_off, PAGE, stride_kblk, stride_vblk,
        HALF, BLOCK_N, GROUPED, BOTH, SKIP, CAUSAL, HAS_VALID, PREC, True, FAST, PAGED,
    )  # fmt: skip
    part = (b * n_kv_heads * HEADS_PER_KV + h) * n_splits + split
    tl.store(M_PART + part, m_i, mask=row_ok)
    tl.store(L_PART + part, l_i, mask=row_ok)
    dd = tl.arange(0, 2 * HALF)
    tl.store(O_PART + part[:, None] * (2 * HALF) + dd[None, :], acc, mask=row_ok[:, None])


#: Splits the merge kernel reads at a time. Fixed, so the kernel compiles once: a constexpr that followed the split
#: count (itself following the number of decode rows) compiled a new variant, ~1 s each, as a server's batch grew.
MERGE_SPLITS = 64


@triton.jit(do_not_specialize=["n_splits"])  # lengths: one compile, not one per divisibility
def _decode_merge_kernel(O_PART, M_PART, L_PART, OUT, n_splits, SPLITS: tl.constexpr, DIM: tl.constexpr):
    """Merge the splits of one (batch, head): one softmax over all of them, ``SPLITS`` at a time."""
    bh = tl.program_id(0)
    dd = tl.arange(0, DIM)
    m_run = tl.max(tl.full([SPLITS], HIDDEN, tl.float32), 0)
    denom = tl.sum(tl.zeros([SPLITS], tl.float32), 0)
    acc = tl.zeros([DIM], tl.float32)
    for s0 in range(0, n_splits, SPLITS):
        s = s0 + tl.arange(0, SPLITS)
        ok = s < n_splits
        m = tl.load(M_PART + bh * n_splits + s, mask=ok, other=HIDDEN)
        l_part = tl.load(L_PART + bh * n_splits + s, mask=ok, other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        alpha = tl.math.exp2(m_run - m_new)
        w = tl.where(ok, tl.math.exp2(m - m_new), 0.0)
        denom = denom * alpha + tl.sum(w * l_part, 0)
        parts = tl.load(O_PART + (bh * n_splits + s)[:, None] * DIM + dd[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha + tl.sum(parts * w[:, None], 0)
        m_run = m_new
    out = acc / tl.where(denom > 0, denom, 1.0)
    out = tl.where(m_run > HIDDEN / 2, out, 0.0)
    tl.store(OUT + bh * DIM + dd, out.to(OUT.dtype.element_ty))


@on_query_device
def decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    offsets: torch.Tensor,
    group_size: int,
    neighbor_window: int,
    inv_freq: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    block_n: int | None = None,
    splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    programs_per_sm: int = 4,
    blocks_per_split: int = 4,
    fast_trig: bool | None = None,
    lengths: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """One query per sequence (``b, h, 1, d``) against the whole cache: split-K SelfExtend decoding.

    ``lengths`` (``b``, a tensor) is for static caches, whose buffers run past the sequence: the
    row's query sits at slot ``lengths[b] - 1`` and later slots are never read.  Read on the GPU,
    so the launch needs no host sync and replays in a CUDA graph.

    Grouped keys are rotated in registers (each key is read once per step, so this costs a few
    sine/cosine evaluations per key, shared by the query heads of its KV head): no grouped copy
    of the cache is kept and nothing is re-rotated in memory.  ``fast_trig`` (default on the GPU)
    takes the hardware sine/cosine after an exact range reduction: libdevice's accurate ones made
    the step 3x slower than plain decoding on an H100, these bring it to ~1.1x at 64k tokens.
    The launch knobs default to the best of a sweep on an H100
    (``benchmarks/triton_blocks.py --kernel decode``).

    Paged (a serving engine's KV cache, read in place): ``key``/``value`` are the caches ``(blocks, kv_h,
    block_size, d)``, ``block_table`` (``b, max_blocks``, int) lists each row's blocks, ``lengths`` its keys
    and ``max_length`` the longest row (host int, sizes the splits).  No copy of the keys is made.
    """
    check_inputs(query, key, value)
    bsz, heads, q_len, dim = query.shape
    if q_len != 1:
        raise ValueError("decode() takes one query per sequence; use prefill() for more")
    paged = block_table is not None
    if paged and (lengths is None or max_length is None):
        raise ValueError("a paged decode needs lengths (a tensor) and max_length (an int)")
    kv_heads, n_keys = key.shape[1], (max_length if paged else key.shape[2])
    per_kv = heads // kv_heads
    interpret = interpreted()
    bn = block_n or (16 if interpret else 64)
    if splits is None:
        on_gpu = not interpret and query.device.type == "cuda"
        target = programs_per_sm * sm_count(query.device.index or 0) if on_gpu else 128
        splits = max(1, min(cdiv(n_keys, blocks_per_split * bn), cdiv(target, bsz * kv_heads)))
    split_len = cdiv(cdiv(n_keys, splits), bn) * bn
    splits = cdiv(n_keys, split_len)
    o_part = torch.empty((bsz * heads * splits, dim), device=query.device, dtype=torch.float32)
    m_part = torch.empty((bsz * heads * splits,), device=query.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    valid, valid_stride, has_valid = valid_arg(key_valid, query)
    inv, off = rope_args(inv_freq, offsets, query.device)
    lens = off if lengths is None else lengths.to(device=query.device, dtype=torch.int32).contiguous()
    if paged:
        table = block_table.to(device=query.device, dtype=torch.int32).contiguous()
        page_args = (table, table.stride(0), key.shape[2], key.stride(0), value.stride(0))
        k_strides, v_strides = (0, key.stride(1), key.stride(2)), (0, value.stride(1), value.stride(2))
    else:
        page_args = (off, 0, 1, 0, 0)
        k_strides, v_strides = (key.stride(0), key.stride(1), key.stride(2)), value.stride()[:3]
    _decode_kernel[(bsz * kv_heads, splits)](
        query, key, value, o_part, m_part, l_part, inv, off, valid, lens, *page_args,
        query.stride(0), query.stride(1),
        *k_strides,
        *v_strides,
        valid_stride, kv_heads, n_keys, split_len, splits, group_size, neighbor_window, scale * LOG2E.value,
        HEADS_PER_KV=per_kv, ROWS=max(16, next_pow2(per_kv)), HALF=dim // 2, BLOCK_N=bn,
        HAS_VALID=has_valid, HAS_LENGTHS=lengths is not None, PREC=precision(query.dtype),
        FAST=not interpret if fast_trig is None else fast_trig, PAGED=paged, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    out = torch.empty((bsz, heads, 1, dim), device=query.device, dtype=query.dtype)
    _decode_merge_kernel[(bsz * heads,)](o_part, m_part, l_part, out, splits, SPLITS=MERGE_SPLITS, DIM=dim, num_warps=4)
    return out
