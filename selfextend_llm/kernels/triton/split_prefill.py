"""SelfExtend prefill split by the work it does: most of it on the fused kernel plain SDPA uses.

For a whole prefill (queries are the keys ``0..n-1``), query ``i`` sees keys ``0..i-W`` at grouped
positions and keys ``i-W+1..i`` at true positions.  The grouped part is *square causal attention*
between the grouped queries ``W..n-1`` and the grouped keys ``0..n-W-1``, the shape every fused
attention kernel is built for, so it runs on the one plain SDPA itself picks (cuDNN on Hopper,
:func:`..lse.causal_attention_lse`, with its row log-sum-exp).  At 32k tokens and beyond that
is nearly all of the work, and SelfExtend costs about what plain attention costs.

Around it: one Triton launch rotates queries and keys to grouped positions
(:func:`.rotate.rotate_to_groups`), and :func:`_neighbor_kernel` does the neighbor band
(``W`` keys per query) and folds the grouped output and LSE into its online softmax as one more
block, so the result is written once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ..lse import causal_attention_lse
from .rotate import rotate_to_groups
from .utils import (
    HIDDEN,
    LOG2E,
    NEAR,
    PLAIN,
    SKIP,
    attn_fwd_inner,
    band_ranges,
    cdiv,
    check_inputs,
    launch_blocks,
    on_query_device,
    precision,
)


@triton.jit(do_not_specialize=["q_len", "g_start", "stride_lb", "stride_lh"])  # lengths: one compile each
def _neighbor_kernel(
    Q,
    K,
    V,
    OG,
    LSEG,
    OUT,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_lb,
    stride_lh,
    stride_lm,
    stride_ob,
    stride_oh,
    stride_om,
    n_heads,
    q_len,
    g_start,
    W,
    qk_scale,
    HEADS_PER_KV: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):
    """The neighbor part of a prefill (keys less than ``W`` back), merged with the grouped part.

    The grouped part (rows ``g_start..``, output ``OG`` and natural-log row LSE ``LSEG``) comes
    from a fused SDPA kernel; here it joins the online softmax as one more block, so the
    final output is written once and no partial of the neighbor part reaches memory.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kvh = h // HEADS_PER_KV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    d = tl.arange(0, HALF)
    q_ptr = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + d[None, :]
    q1 = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
    q2 = tl.load(q_ptr + HALF, mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], HIDDEN, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, 2 * HALF], dtype=tl.float32)
    k_off = K + b * stride_kb + kvh * stride_kh
    v_off = V + b * stride_vb + kvh * stride_vh
    first = pid_m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, q_len) - 1
    # Only keys less than W back: the window edge and the diagonal are masked to the band, the
    # blocks between are inside every row's window; the grouped keys come from OG and LSEG below.
    lo, mid_start, diag_start, end = band_ranges(first, last, W, BLOCK_N)
    no_inv = tl.zeros([HALF], dtype=tl.float32)  # rotation unused on this path
    acc, m_i, l_i = attn_fwd_inner(
        acc, m_i, l_i, q1, q2, q1, q2, rows, k_off, k_off, v_off, k_off, no_inv, 0,
        lo, lo, mid_start, diag_start, end, stride_kn, stride_kn, stride_vn, 1, W, qk_scale,
        k_off, 1, 0, 0, HALF, BLOCK_N, SKIP, NEAR, PLAIN, NEAR, False, PREC, False, False, False,
    )  # fmt: skip
    g_ok = row_ok & (rows >= g_start)
    g_rows = rows - g_start
    lse = tl.load(LSEG + b * stride_lb + h * stride_lh + g_rows * stride_lm, mask=g_ok, other=0.0)
    lse = tl.where(g_ok, lse * LOG2E, HIDDEN)  # to the kernel's log2 units
    og_ptr = OG + b * stride_gb + h * stride_gh + g_rows[:, None] * stride_gm + tl.arange(0, 2 * HALF)[None, :]
    og = tl.load(og_ptr, mask=g_ok[:, None], other=0.0).to(tl.float32)
    m_new = tl.maximum(m_i, lse)
    alpha = tl.math.exp2(m_i - m_new)
    beta = tl.math.exp2(lse - m_new)
    out = (acc * alpha[:, None] + og * beta[:, None]) / (l_i * alpha + beta)[:, None]
    o_ptr = OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + tl.arange(0, 2 * HALF)[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


@on_query_device
def prefill_split(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    offsets: torch.Tensor,
    group_size: int,
    neighbor_window: int,
    inv_freq: torch.Tensor,
    scale: float,
    grouped_attention: Callable[..., tuple[torch.Tensor, torch.Tensor]] = causal_attention_lse,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """A whole prefill (queries are the keys ``0..n-1``, no padding), split by the work it does.

    A query ``i`` sees keys ``0..i-W`` grouped, and that is square causal attention between the
    grouped queries ``W..n-1`` and the grouped keys ``0..n-W-1``: almost all of the work, done
    by the same fused kernel that plain SDPA uses (:func:`..lse.causal_attention_lse`).  The
    neighbor band (``W`` keys per query) runs in Triton and folds the grouped part's output and
    LSE into its softmax as it finishes, so the result is written once.  ``grouped_attention``
    (square causal attention returning the output and the natural-log row LSE) is replaceable,
    e.g. to try another fused kernel.
    """
    check_inputs(query, key, value)
    bsz, heads, n, dim = query.shape
    if key.shape[2] != n:
        raise ValueError(f"prefill_split() needs as many keys as queries (got {key.shape[2]} and {n})")
    out = torch.empty_like(query)
    if n == 0:
        return out
    W = neighbor_window
    m = max(0, n - W)
    if m > 0:
        # The grouped queries are parked in the output's rows W.. (overwritten at the end).
        qg, kg = rotate_to_groups(
            query[:, :, W:], offsets, index0=W, group_size=group_size, neighbor_window=W, inv_freq=inv_freq,
            queries=True, out=out[:, :, W:], keys=key[:, :, :m],
        )  # fmt: skip
        og, lse = grouped_attention(qg, kg, value[:, :, :m], scale)
        del qg, kg
    else:
        og, lse = out, torch.zeros((bsz, heads, 1), device=query.device)  # never read: no row has grouped keys
    bm, bn, warps, stages = launch_blocks(dim, query.dtype, block_m, block_n, num_warps, num_stages)
    _neighbor_kernel[(cdiv(n, bm), bsz * heads)](
        query, key, value, og, lse, out,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        og.stride(0), og.stride(1), og.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, n, W if m > 0 else n, W, scale * LOG2E.value,
        HEADS_PER_KV=heads // key.shape[1], HALF=dim // 2, BLOCK_M=bm, BLOCK_N=bn, PREC=precision(query.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
