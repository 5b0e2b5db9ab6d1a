"""The straightforward two-score-matrix SelfExtend, in float64, for checking the fast paths.

It builds the full neighbor and grouped score matrices from *unrotated* states (rotating them
afresh to true and grouped positions), picks per entry by distance, and takes one softmax.
Quadratic in memory: for tests and benchmarks only.
"""

from __future__ import annotations

import torch

from .kernels.lse import repeat_kv
from .rope import Layout, grouped_key_position, grouped_query_position, rotate


def reference_selfextend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    group_size: int,
    neighbor_window: int,
    inv_freq: torch.Tensor,
    layout: Layout = "half",
    scale: float,
    mask: torch.Tensor | None = None,
    rotated: bool = True,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention output (``b, h, q, d``) by the formula.

    ``rotated=True`` means ``query``/``key`` already carry RoPE at their positions (as inside
    transformers); they are rotated back to position 0 first.  ``mask`` (``b|1, 1, q, n``) is
    True where a key may be seen; it defaults to causal by position.
    """
    q = query.double()
    k = repeat_kv(key, query.shape[1] // key.shape[1]).double()
    v = repeat_kv(value, query.shape[1] // value.shape[1]).double()
    bsz = q.shape[0]
    qp = query_positions.expand(bsz, -1).long()
    kp = key_positions.expand(bsz, -1).long()
    if rotated:
        q = rotate(q, -qp, inv_freq, layout)
        k = rotate(k, -kp, inv_freq, layout)
    qn, kn = rotate(q, qp, inv_freq, layout), rotate(k, kp, inv_freq, layout)
    qg = rotate(q, grouped_query_position(qp, group_size, neighbor_window), inv_freq, layout)
    kg = rotate(k, grouped_key_position(kp, group_size), inv_freq, layout)
    neighbor = qn @ kn.transpose(-1, -2)
    grouped = qg @ kg.transpose(-1, -2)
    dist = (qp[:, :, None] - kp[:, None, :])[:, None]
    scores = torch.where(dist < neighbor_window, neighbor, grouped) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = dist >= 0
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v


def reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    max_seqlen_q: int,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_k: int,
    cu_seqlens_k: torch.Tensor | None = None,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float,
    causal: bool = False,
    window_size: list[int] | tuple[int, int] = (-1, -1),
    return_softmax_lse: bool = False,
    fa_version: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's ``flash_attn_varlen_func`` in float64, explicit scores: what the varlen prefill of
    :mod:`selfextend_llm.kernels.paged` is tested against where FlashAttention itself cannot run.

    Packed queries ``(total_q, heads, d)``; keys and values packed ``(total_k, kv_heads, d)`` with ``cu_seqlens_k``,
    or paged ``(blocks, block_size, kv_heads, d)`` with ``block_table`` and ``seqused_k``.  Causal masks are
    aligned to the bottom right and query ``i`` of a sequence sees keys ``[i + sk - sq - left, i + sk - sq +
    right]`` (a negative bound: unbounded), as FlashAttention documents.  The LSE is ``(heads, total_q)``.
    """
    del max_seqlen_q, max_seqlen_k, fa_version  # sizes come from the index tensors here
    left, right = window_size
    outs, lses = [], []
    n_seq = cu_seqlens_q.shape[0] - 1
    for s in range(n_seq):
        q0, q1 = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1])
        if block_table is not None:
            n = int(seqused_k[s])
            page = k.shape[1]
            blocks = block_table[s, : -(-n // page)].long()
            ks = k.index_select(0, blocks).reshape(-1, *k.shape[2:])[:n]
            vs = v.index_select(0, blocks).reshape(-1, *v.shape[2:])[:n]
        else:
            k0, k1 = int(cu_seqlens_k[s]), int(cu_seqlens_k[s + 1])
            ks, vs = k[k0:k1], v[k0:k1]
        qs = q[q0:q1].double().transpose(0, 1)  # (heads, sq, d)
        rep = q.shape[1] // k.shape[-2]
        ks = ks.double().transpose(0, 1).repeat_interleave(rep, 0)
        vs = vs.double().transpose(0, 1).repeat_interleave(rep, 0)
        sq, sk = qs.shape[1], ks.shape[1]
        i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        j = torch.arange(sk, device=q.device)[None, :]
        visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
        if causal or right >= 0:
            visible &= j <= i + (0 if causal else right)
        if left >= 0:
            visible &= j >= i - left
        scores = (qs @ ks.transpose(-1, -2) * softmax_scale).masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, -1)
        weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0)[..., None])
        outs.append((weights @ vs).transpose(0, 1))
        lses.append(lse)
    out = torch.cat(outs).to(q.dtype)
    return (out, torch.cat(lses, dim=1).float()) if return_softmax_lse else out
