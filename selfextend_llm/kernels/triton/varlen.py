"""A serving step's prefills packed for varlen attention kernels: the rows they read, and the merge after.

A step's prefill chunks (any number of sequences, queries ``n - q .. n - 1`` over keys ``0 .. n - 1`` in a paged
cache) split into two varlen attention calls of a fused kernel that returns the row LSE (vLLM's FlashAttention 3:
:func:`selfextend_llm.kernels.paged.paged_varlen_prefill`):

* the **neighbor band**, keys less than ``W`` back at their true positions: a sliding-window causal call that reads
  the paged cache in place; its queries are the step's rows (log-scaled where the grouping says so), packed by
  :func:`pack_queries`;
* the **grouped part**, keys ``0 .. t - W`` at grouped positions: square-or-bottom-right causal attention between
  the grouped queries and the grouped keys of every sequence, packed back to back by :func:`pack_queries` and
  :func:`pack_grouped_kv` (keys gathered through the block table and re-rotated, values copied);

and :func:`merge_into` folds the two (output, LSE) pairs into one softmax, written once to the step's output rows.
Each launch serves every sequence of the step: no host loop per sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreted
from .utils import cdiv, cos_sin, floordiv, on_query_device


@triton.jit
def _rotate_store(x1, x2, shift, INV, d, dst, live, HALF: tl.constexpr, FAST: tl.constexpr):
    """Store half-layout rows ``(x1, x2)`` (float32) rotated by ``shift`` positions; the angle reduced in float64."""
    ang = shift.to(tl.float64)[:, None] * tl.load(INV + d).to(tl.float64)[None, :]
    ang = (ang - tl.floor(ang / 6.283185307179586 + 0.5) * 6.283185307179586).to(tl.float32)
    c, s = cos_sin(ang, FAST)
    tl.store(dst, (x1 * c - x2 * s).to(dst.dtype.element_ty), mask=live)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(dst.dtype.element_ty), mask=live)


@triton.jit(do_not_specialize=["n_rows"])
def _pack_queries_kernel(
    Q, QN, QG, SRC, POS, GROW, FACTOR, INV,
    stride_qt, stride_qh, stride_nt, stride_nh, stride_gt, stride_gh,
    n_rows, heads, G, W,
    HAS_FACTOR: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """Row ``r``: step query ``SRC[r]`` at position ``POS[r]``, times ``FACTOR[r]`` (log scaling), to ``QN[r]``, and
    rotated to its grouped position to ``QG[GROW[r]]`` where ``GROW[r] >= 0`` (rows with grouped keys)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    d = tl.arange(0, HALF)
    src = tl.load(SRC + rows, mask=ok, other=0)
    pos = tl.load(POS + rows, mask=ok, other=0)
    grow = tl.load(GROW + rows, mask=ok, other=-1)
    q_ptr = Q + src[:, None].to(tl.int64) * stride_qt + h * stride_qh + d[None, :]
    x1 = tl.load(q_ptr, mask=ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(q_ptr + HALF, mask=ok[:, None], other=0.0).to(tl.float32)
    if HAS_FACTOR:
        f = tl.load(FACTOR + rows, mask=ok, other=1.0)
        x1 = x1 * f[:, None]
        x2 = x2 * f[:, None]
    n_ptr = QN + rows[:, None].to(tl.int64) * stride_nt + h * stride_nh + d[None, :]
    tl.store(n_ptr, x1.to(QN.dtype.element_ty), mask=ok[:, None])
    tl.store(n_ptr + HALF, x2.to(QN.dtype.element_ty), mask=ok[:, None])
    g_ok = ok & (grow >= 0)
    shift = floordiv(pos, G) + (W - W // G) - pos
    g_ptr = QG + tl.maximum(grow, 0)[:, None].to(tl.int64) * stride_gt + h * stride_gh + d[None, :]
    _rotate_store(x1, x2, shift, INV, d, g_ptr, g_ok[:, None], HALF, FAST)


@triton.jit(do_not_specialize=["n_rows", "stride_bt"])
def _pack_grouped_kv_kernel(
    K, V, KG, VG, BT, SEQ, KPOS, INV,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_gt, stride_gh, stride_ut, stride_uh,
    stride_bt, n_rows, G, PAGE,
    HALF: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """Row ``r``: sequence ``SEQ[r]``'s key at position ``KPOS[r]``, read through its block-table row, rotated to
    ``KPOS[r] // G`` into ``KG[r]``; its value copied to ``VG[r]``."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    d = tl.arange(0, HALF)
    seq = tl.load(SEQ + rows, mask=ok, other=0)
    pos = tl.load(KPOS + rows, mask=ok, other=0)
    block = tl.load(BT + seq.to(tl.int64) * stride_bt + pos // PAGE, mask=ok, other=0).to(tl.int64)
    row = pos % PAGE
    k_ptr = K + block[:, None] * stride_kb + h * stride_kh + row[:, None] * stride_kn + d[None, :]
    x1 = tl.load(k_ptr, mask=ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(k_ptr + HALF, mask=ok[:, None], other=0.0).to(tl.float32)
    g_ptr = KG + rows[:, None].to(tl.int64) * stride_gt + h * stride_gh + d[None, :]
    _rotate_store(x1, x2, floordiv(pos, G) - pos, INV, d, g_ptr, ok[:, None], HALF, FAST)
    dd = tl.arange(0, 2 * HALF)
    v = tl.load(
        V + block[:, None] * stride_vb + h * stride_vh + row[:, None] * stride_vn + dd[None, :], mask=ok[:, None]
    )
    tl.store(VG + rows[:, None].to(tl.int64) * stride_ut + h * stride_uh + dd[None, :], v, mask=ok[:, None])


@triton.jit(do_not_specialize=["n_rows"])
def _merge_kernel(
    ON, LN, OG, LG, GROW, DST, OUT,
    stride_ont, stride_onh, stride_lnh, stride_lnt, stride_ogt, stride_ogh, stride_lgh, stride_lgt,
    stride_ot, stride_oh, n_rows,
    DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Row ``r``, head ``h``: the band's (``ON``, ``LN``) and, where ``GROW[r] >= 0``, the grouped part's
    (``OG``, ``LG``) as one softmax over both key sets, to ``OUT[DST[r]]``.  LSEs: natural logs, ``(heads, rows)``."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    d = tl.arange(0, DIM)
    grow = tl.load(GROW + rows, mask=ok, other=-1)
    g_ok = ok & (grow >= 0)
    g = tl.maximum(grow, 0).to(tl.int64)
    ln = tl.load(LN + h * stride_lnh + rows * stride_lnt, mask=ok, other=0.0)
    lg = tl.load(LG + h * stride_lgh + g * stride_lgt, mask=g_ok, other=float("-inf"))
    m = tl.maximum(ln, lg)
    wn = tl.exp(ln - m)
    wg = tl.where(g_ok, tl.exp(lg - m), 0.0)
    total = wn + wg
    on = tl.load(
        ON + rows[:, None].to(tl.int64) * stride_ont + h * stride_onh + d[None, :], mask=ok[:, None], other=0.0
    )
    og = tl.load(OG + g[:, None] * stride_ogt + h * stride_ogh + d[None, :], mask=g_ok[:, None], other=0.0)
    out = on.to(tl.float32) * (wn / total)[:, None] + og.to(tl.float32) * (wg / total)[:, None]
    dst = tl.load(DST + rows, mask=ok, other=0).to(tl.int64)
    tl.store(
        OUT + dst[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(OUT.dtype.element_ty), mask=ok[:, None]
    )


def _block() -> int:
    return 16 if interpreted() else 64


@on_query_device
def pack_queries(
    query: torch.Tensor,
    src: torch.Tensor,
    positions: torch.Tensor,
    grouped_row: torch.Tensor,
    n_grouped: int,
    *,
    group_size: int,
    neighbor_window: int,
    inv_freq: torch.Tensor,
    factor: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The band's queries ``(rows, heads, d)`` (step rows ``src``, times ``factor``) and the grouped queries
    ``(n_grouped, heads, d)`` (the rows with ``grouped_row >= 0``, also rotated to ``p // G + W - W // G``)."""
    rows, (heads, dim) = src.shape[0], query.shape[1:]
    qn = torch.empty(rows, heads, dim, dtype=query.dtype, device=query.device)
    qg = torch.empty(max(n_grouped, 1), heads, dim, dtype=query.dtype, device=query.device)
    if rows:
        _pack_queries_kernel[(cdiv(rows, _block()), heads)](
            query, qn, qg, src, positions, grouped_row, qn if factor is None else factor, inv_freq,
            query.stride(0), query.stride(1), qn.stride(0), qn.stride(1), qg.stride(0), qg.stride(1),
            rows, heads, group_size, neighbor_window,
            HAS_FACTOR=factor is not None, HALF=dim // 2, BLOCK=_block(), FAST=not interpreted(), num_warps=4,
        )  # fmt: skip
    return qn, qg[:n_grouped]


@on_query_device
def pack_grouped_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq: torch.Tensor,
    key_positions: torch.Tensor,
    *,
    group_size: int,
    inv_freq: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (rotated from ``p`` to ``p // G``) and values of rows ``(seq[r], key_positions[r])`` of a paged cache
    (``blocks, kv_heads, block_size, d`` views), packed ``(rows, kv_heads, d)``."""
    rows, (_, kv_heads, page, dim) = seq.shape[0], key_cache.shape
    kg = torch.empty(rows, kv_heads, dim, dtype=key_cache.dtype, device=key_cache.device)
    vg = torch.empty(rows, kv_heads, value_cache.shape[-1], dtype=value_cache.dtype, device=value_cache.device)
    if value_cache.shape[-1] != dim:
        raise ValueError(f"packed grouped values need the key head size ({dim}), got {value_cache.shape[-1]}")
    if rows:
        _pack_grouped_kv_kernel[(cdiv(rows, _block()), kv_heads)](
            key_cache, value_cache, kg, vg, block_table, seq, key_positions, inv_freq,
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            kg.stride(0), kg.stride(1), vg.stride(0), vg.stride(1), block_table.stride(0), rows, group_size, page,
            HALF=dim // 2, BLOCK=_block(), FAST=not interpreted(), num_warps=4,
        )  # fmt: skip
    return kg, vg


@on_query_device
def merge_into(
    out: torch.Tensor,
    dst: torch.Tensor,
    band: tuple[torch.Tensor, torch.Tensor],
    grouped: tuple[torch.Tensor, torch.Tensor],
    grouped_row: torch.Tensor,
) -> None:
    """``out[dst[r]]`` = the band's row ``r`` and the grouped part's row ``grouped_row[r]`` (if any) merged by
    their LSEs (``heads, rows``, natural log): exactly one softmax over both key sets."""
    (on, ln), (og, lg) = band, grouped
    rows, heads, dim = on.shape
    if not rows:
        return
    if lg.numel() == 0:  # no row has grouped keys: any tensor stands in, never read
        og, lg = on, ln
    ln, lg = ln.float(), lg.float()
    _merge_kernel[(cdiv(rows, _block()), heads)](
        on, ln, og, lg, grouped_row, dst, out,
        on.stride(0), on.stride(1), ln.stride(0), ln.stride(1), og.stride(0), og.stride(1), lg.stride(0), lg.stride(1),
        out.stride(0), out.stride(1), rows, DIM=dim, BLOCK=_block(), num_warps=4,
    )  # fmt: skip
