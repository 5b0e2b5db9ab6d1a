"""Re-rotation of cached rows to grouped positions, on the GPU (both kinds of prefill use it).

Keys go from position ``p`` to ``p // G``; queries to ``p // G + W - W // G``.  One launch can
rotate queries and keys together (the split prefill rotates both before its fused grouped part).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreted
from .utils import cdiv, cos_sin, floordiv, on_query_device, rope_args


@triton.jit(do_not_specialize=["n_rows", "x_index0", "y_index0"])  # lengths: one compile, not one per divisibility
def _rotate_kernel(
    X,
    OUT,
    Y,
    OUT_Y,
    INV,
    OFF,
    stride_xb,
    stride_xh,
    stride_xn,
    stride_ob,
    stride_oh,
    stride_on,
    stride_yb,
    stride_yh,
    stride_yn,
    stride_pb,
    stride_ph,
    stride_pn,
    x_heads,
    y_heads,
    n_rows,
    x_index0,
    y_index0,
    G,
    W,
    X_QUERY: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
    HEADS: tl.constexpr,
    FAST: tl.constexpr,
):
    """Rotate rows of ``x`` (cache indices ``x_index0 + t``) to grouped positions, and in the
    same launch rows of keys ``y`` (``y_index0 + t``; head blocks past ``x``'s).

    A program owns a block of positions and ``HEADS`` heads of one sequence, so each
    cosine/sine serves several heads while the grid still fills the GPU.  The angle is formed
    in float64 and reduced modulo 2 pi before the float32 cosine, as in :func:`rope.rotate`.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1)
    hb = tl.program_id(2)
    x_blocks = (x_heads + HEADS - 1) // HEADS
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    if hb < x_blocks:
        src, dst, n_heads, h0, index0 = X, OUT, x_heads, hb * HEADS, x_index0
        sb, sh, sn, db, dh, dn = stride_xb, stride_xh, stride_xn, stride_ob, stride_oh, stride_on
    else:
        src, dst, n_heads, h0, index0 = Y, OUT_Y, y_heads, (hb - x_blocks) * HEADS, y_index0
        sb, sh, sn, db, dh, dn = stride_yb, stride_yh, stride_yn, stride_pb, stride_ph, stride_pn
    pos = index0 + rows - tl.load(OFF + b)
    shift = floordiv(pos, G) - pos
    if X_QUERY:
        shift += tl.where(hb < x_blocks, W - W // G, 0)
    d = tl.arange(0, HALF)
    ang = shift.to(tl.float64)[:, None] * tl.load(INV + d).to(tl.float64)[None, :]
    ang = (ang - tl.floor(ang / 6.283185307179586 + 0.5) * 6.283185307179586).to(tl.float32)
    c, s = cos_sin(ang, FAST)
    for hh in range(HEADS):
        h = h0 + hh
        live = ok[:, None] & (h < n_heads)
        xp = src + b * sb + h * sh + rows[:, None] * sn + d[None, :]
        op = dst + b * db + h * dh + rows[:, None] * dn + d[None, :]
        x1 = tl.load(xp, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=live, other=0.0).to(tl.float32)
        tl.store(op, (x1 * c - x2 * s).to(dst.dtype.element_ty), mask=live)
        tl.store(op + HALF, (x2 * c + x1 * s).to(dst.dtype.element_ty), mask=live)


def rotate_to_groups(
    x: torch.Tensor,
    offsets: torch.Tensor,
    *,
    index0: int,
    group_size: int,
    inv_freq: torch.Tensor,
    queries: bool,
    neighbor_window: int = 0,
    out: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    keys_index0: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (``b, h, n, d``, cache indices ``index0..``) re-rotated to grouped positions.

    Keys go from ``p`` to ``p // G``; queries (``queries=True``) to ``p // G + W - W // G``.
    ``out`` may be a strided view (the split prefill parks the grouped queries in its output).
    With ``keys`` (as many rows as ``x``, cache indices ``keys_index0..``), those are rotated as
    keys in the same launch and ``(out, rotated keys)`` is returned.
    """
    bsz, heads, n, dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    y = x if keys is None else keys
    if keys is not None and keys.shape[2] != n:
        raise ValueError(f"keys to rotate with the queries need {n} rows, got {keys.shape[2]}")
    out_y = out if keys is None else torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if n:
        interpret = interpreted()
        block, per_program = (16, 2) if interpret else (64, 2)
        inv, off = rope_args(inv_freq, offsets, x.device)
        y_heads = 0 if keys is None else y.shape[1]
        head_blocks = cdiv(heads, per_program) + cdiv(y_heads, per_program)
        _rotate_kernel[(cdiv(n, block), bsz, head_blocks)](
            x, out, y, out_y, inv, off,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
            y.stride(0), y.stride(1), y.stride(2), out_y.stride(0), out_y.stride(1), out_y.stride(2),
            heads, y_heads, n, index0, keys_index0, group_size, neighbor_window, X_QUERY=queries, HALF=dim // 2,
            BLOCK=block, HEADS=per_program, FAST=not interpret, num_warps=4,
        )  # fmt: skip
    return out if keys is None else (out, out_y)


@on_query_device
def rotate_keys_to_groups(
    key: torch.Tensor, offsets: torch.Tensor, group_size: int, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Cached keys (``b, kv_h, n, d``) re-rotated from position ``p`` to ``p // G``."""
    return rotate_to_groups(key, offsets, index0=0, group_size=group_size, inv_freq=inv_freq, queries=False)
