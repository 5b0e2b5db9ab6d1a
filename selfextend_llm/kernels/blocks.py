"""The block algorithm: SelfExtend on any attention kernel that returns the row log-sum-exp.

For a query at cache index ``i`` and a key at ``j``:

* ``i - j < W`` (neighbor window): the plain score ``q(p_i) . k(p_j)``;
* ``i - j >= W``: the grouped score ``q(p_i // G + W - W // G) . k(p_j // G)``.

Both kinds of score share one softmax.  Instead of two ``n x n`` score matrices, each block of
queries is attended in up to three key ranges, each through a fused kernel that returns the
row log-sum-exp (:mod:`.lse`), and the parts are merged exactly (:func:`.lse.merge_partials`):

1. keys every query of the block sees grouped (no mask but padding),
2. keys at the window edge, seen grouped by some queries of the block (small mask),
3. keys inside the window of some query of the block (plain rotation, band mask).

Memory per block is ``block x (block + W)`` mask entries, never ``n x n``.  This path serves the
CPU, softcapping, custom masks and RoPE layouts the Triton kernels do not take.  Grouped keys are
kept between decode steps (:class:`GroupedKeyCache`), so a step rotates only its own key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rope import Layout, grouped_key_position, rotate
from .lse import NEG_INF, Kernel, attention_with_lse, merge_partials

#: Query rows per block. Small blocks keep the masked (window-edge) work small: on CPU at 8k tokens,
#: 128 rows cost 1.28x plain SDPA against 1.51x for 1024 (see BENCHMARKS.md).
DEFAULT_BLOCK_SIZE = 128


@dataclass
class GroupedKeyCache:
    """Keys already rotated to grouped positions, kept between decode steps of one layer.

    Rotating the whole cache at every step (what LongLM does) costs O(n) per token per layer;
    this cache makes it O(new tokens).  It is only reused when the new call provably continues
    the same sequence: same length, same grouping, same position offsets and the same raw key
    at the junction.
    """

    keys: torch.Tensor
    last_raw_key: torch.Tensor
    offsets: torch.Tensor
    group_size: int
    #: Storage that ``keys`` is a prefix view of, with room to grow: decode steps write the new
    #: key in place instead of copying the whole cache (amortised O(1) per token).
    buffer: torch.Tensor

    def continues(self, raw_keys: torch.Tensor, start: int, offsets: torch.Tensor, group_size: int) -> bool:
        return (
            start > 0
            and self.keys.shape[2] == start
            and self.keys.shape[:2] == raw_keys.shape[:2]
            and self.group_size == group_size
            and self.keys.device == raw_keys.device
            and torch.equal(self.offsets, offsets)
            and torch.equal(self.last_raw_key, raw_keys[:, :, start - 1])
        )


def row_offsets(query_positions: torch.Tensor, query_start: int) -> torch.Tensor:
    """Each row's offset between cache index and RoPE position (``b``).

    Within a row, positions advance one per cache slot (left padding only shifts the start), so
    the last query fixes the offset of the whole row: ``offset = index(last query) - pos``.
    """
    last_index = query_start + query_positions.shape[1] - 1
    return last_index - query_positions[:, -1].long()


def key_positions(query_positions: torch.Tensor, query_start: int, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of all cached keys, and each row's offset (:func:`row_offsets`)."""
    offsets = row_offsets(query_positions, query_start)
    index = torch.arange(num_keys, device=query_positions.device)
    return index[None, :] - offsets[:, None], offsets


def grouped_keys(
    keys: torch.Tensor,
    positions: torch.Tensor,
    offsets: torch.Tensor,
    needed: int,
    group_size: int,
    inv_freq: torch.Tensor,
    layout: Layout,
    cache: GroupedKeyCache | None,
    query_start: int,
    into: torch.Tensor | None = None,
    memo: dict | None = None,
) -> tuple[torch.Tensor, GroupedKeyCache]:
    """Grouped-rotated keys ``[0, needed)``, reusing and extending ``cache`` where it applies.

    ``into`` is storage to write into when starting afresh (a static cache's grouped mirror).
    """
    if cache is not None and needed >= query_start and cache.continues(keys, query_start, offsets, group_size):
        start, buffer = query_start, cache.buffer
    else:
        start, buffer = 0, into
    pos = positions[:, start:needed]
    shift = grouped_key_position(pos, group_size) - pos
    fresh = rotate(keys[:, :, start:needed], shift, inv_freq, layout, memo, f"k{group_size}:{start}:{needed}")
    if buffer is None or buffer.shape[2] < needed:
        grown = torch.empty(
            (*keys.shape[:2], needed + max(256, needed // 8), keys.shape[3]), dtype=keys.dtype, device=keys.device
        )
        if start:
            grown[:, :, :start] = buffer[:, :, :start]
        buffer = grown
    buffer[:, :, start:needed] = fresh
    out = buffer[:, :, :needed]
    new_cache = GroupedKeyCache(
        keys=out,
        last_raw_key=keys[:, :, needed - 1].clone() if needed else keys[:, :, :0],
        offsets=offsets.clone(),
        group_size=group_size,
        buffer=buffer,
    )
    return out, new_cache


def region_mask(
    rows: torch.Tensor,
    k0: int,
    k1: int,
    band: str,
    window: int,
    key_valid: torch.Tensor | None,
    full_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """Boolean mask of keys ``[k0, k1)`` for query cache indices ``rows``; None when all are visible.

    ``band`` is ``"bulk"`` (all grouped: only padding matters), ``"edge"`` (grouped where the
    distance is at least ``window``) or ``"near"`` (plain where ``0 <= distance < window``).
    """
    mask = None
    if band != "bulk":
        dist = rows[:, None] - torch.arange(k0, k1, device=rows.device)[None, :]
        mask = (dist >= window) if band == "edge" else (dist >= 0) & (dist < window)
        mask = mask[None, None]
    if key_valid is not None:
        valid = key_valid[:, None, None, k0:k1]
        mask = valid if mask is None else mask & valid
    if full_mask is not None:
        extra = full_mask[..., k0:k1]
        mask = extra if mask is None else mask & extra
    return mask


def decode_explicit(
    query: torch.Tensor,
    grouped_query: torch.Tensor,
    key: torch.Tensor,
    grouped_key: torch.Tensor,
    value: torch.Tensor,
    boundary: int,
    key_valid: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One query per row (decoding) with explicit scores: one softmax, no merge.

    Keys ``[0, boundary)`` are scored grouped, the rest plainly; the two score rows are joined and
    the values read once.  For a single query the scores are tiny (``heads x n``), so this is
    three matrix products and a softmax, where two fused kernels and an LSE merge cost the CPU
    about twice the small-op overhead.  Query heads of a KV head are stacked as rows of one
    product, so the cache is read once per KV head and never repeated.
    """
    bsz, heads, _, dim = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    rows = (bsz, kv_heads, heads // kv_heads, dim)
    far = torch.matmul(grouped_query.reshape(rows), grouped_key[:, :, :boundary].transpose(-1, -2))
    near = torch.matmul(query.reshape(rows), key[:, :, boundary:n].transpose(-1, -2))
    scores = torch.cat((far, near), dim=-1).float() * scale
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :n], NEG_INF)
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # a row of padding only: zeros
    out = torch.matmul(probs.to(value.dtype), value[:, :, :n])
    return out.reshape(bsz, heads, 1, value.shape[-1])


def block_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    grouped_query: torch.Tensor,
    grouped_key: torch.Tensor,
    *,
    query_start: int,
    neighbor_window: int,
    scale: float,
    key_valid: torch.Tensor | None = None,
    full_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    kernel: Kernel = "auto",
) -> torch.Tensor:
    """SelfExtend attention by query blocks, each over its three key ranges (see the module doc).

    ``grouped_query`` is ``query`` rotated to grouped positions; ``grouped_key`` holds the grouped
    keys ``[0, m)`` for at least every key some query sees grouped.
    """
    q_len, n_keys = query.shape[2], key.shape[2]
    W = neighbor_window
    grouped_needed = max(0, min(n_keys, query_start + q_len - W))
    kg = grouped_key
    outputs = []
    for t0 in range(0, q_len, block_size):
        t1 = min(q_len, t0 + block_size)
        i0, i1 = query_start + t0, query_start + t1
        q_blk = query[:, :, t0:t1]
        rows = torch.arange(i0, i1, device=query.device)
        fm_blk = None if full_mask is None else full_mask[:, :, t0:t1]

        parts = []
        bulk_end = max(0, min(n_keys, i0 - W + 1))
        edge_end = max(bulk_end, min(grouped_needed, i1 - W))
        near_start, near_end = bulk_end, min(n_keys, i1)
        if edge_end > 0:
            qg = grouped_query[:, :, t0:t1]
            if bulk_end > 0:
                parts.append(
                    attention_with_lse(
                        qg,
                        kg[:, :, :bulk_end],
                        value[:, :, :bulk_end],
                        region_mask(rows, 0, bulk_end, "bulk", W, key_valid, fm_blk),
                        scale,
                        softcap,
                        kernel,
                    )
                )
            if edge_end > bulk_end:
                parts.append(
                    attention_with_lse(
                        qg,
                        kg[:, :, bulk_end:edge_end],
                        value[:, :, bulk_end:edge_end],
                        region_mask(rows, bulk_end, edge_end, "edge", W, key_valid, fm_blk),
                        scale,
                        softcap,
                        kernel,
                    )
                )
        parts.append(
            attention_with_lse(
                q_blk,
                key[:, :, near_start:near_end],
                value[:, :, near_start:near_end],
                region_mask(rows, near_start, near_end, "near", W, key_valid, fm_blk),
                scale,
                softcap,
                kernel,
            )
        )
        outputs.append(merge_partials(parts, query.dtype))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
