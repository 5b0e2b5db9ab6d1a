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
from .lse import (
    NEG_INF,
    Kernel,
    attention_with_lse,
    causal_block_with_lse,
    merge_partials,
    two_score_attention,
)
from .native import decode as native_decode

#: Query rows per block. Small blocks keep the masked (window-edge) work small: on CPU at 8k tokens,
#: 128 rows cost 1.28x plain SDPA against 1.51x for 1024 (see BENCHMARKS.md).
DEFAULT_BLOCK_SIZE = 128
#: Query rows per block where nothing but the window is masked (:func:`_grouped_at_once`): every part
#: is then a fused call without a mask tensor, and large calls run the CPU flash kernel at its best
#: rate (1,024 rows: 1.13x plain SDPA for one layer at 8k against 1.20x for 256; BENCHMARKS.md).
UNMASKED_BLOCK_SIZE = 1024


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
    product, so the cache is read once per KV head and never repeated.  On the CPU in float32 the
    same step runs on C loops (:mod:`.native.decode`) that read the cache at about twice the speed.
    """
    native_out = native_decode.decode_attention(
        query, grouped_query, key, grouped_key, value, boundary, key_valid, scale
    )
    if native_out is not None:
        return native_out
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
    block_size: int | None = None,
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
    if key_valid is None and full_mask is None and softcap is None and W >= 2 and grouped_needed > 0:
        rows = min(block_size or UNMASKED_BLOCK_SIZE, W - 1)
        return _grouped_at_once(
            query, key, value, grouped_query, kg, query_start, W, scale, rows, kernel, grouped_needed
        )
    block_size = block_size or DEFAULT_BLOCK_SIZE
    outputs = []
    for t0 in range(0, q_len, block_size):
        t1 = min(q_len, t0 + block_size)
        i0, i1 = query_start + t0, query_start + t1
        q_blk = query[:, :, t0:t1]
        rows = torch.arange(i0, i1, device=query.device)
        fm_blk = None if full_mask is None else full_mask[:, :, t0:t1]

        def part(q, keys, k0, k1, band, rows=rows, fm_blk=fm_blk):
            mask = region_mask(rows, k0, k1, band, W, key_valid, fm_blk)
            return attention_with_lse(q, keys[:, :, k0:k1], value[:, :, k0:k1], mask, scale, softcap, kernel)

        # Key ranges of this block (cache indices), each seen the same way by every row but the edge:
        #   [0, bulk)       grouped for every row: no mask
        #   [bulk, edge)    the window's edge (B - 1 keys): grouped for some rows, plain for the others
        #   [edge, i0)      plain for every row: no mask
        #   [i0, i1)        the diagonal block: plain, causal (the fused kernel's own causal mode)
        # Only the two edge parts and the diagonal carry a mask, each at most B x B.  (A window narrower
        # than the block makes the edge overlap the diagonal: then the plain keys are one masked band.)
        bulk_end = max(0, min(n_keys, i0 - W + 1))
        edge_end = max(bulk_end, min(grouped_needed, i1 - W))
        parts = []
        if bulk_end > 0:
            parts.append(part(grouped_query[:, :, t0:t1], kg, 0, bulk_end, "bulk"))
        d1 = min(i1, n_keys)
        if edge_end > i0:  # a window narrower than the block: the edge reaches into the diagonal, one band
            parts.append(part(grouped_query[:, :, t0:t1], kg, bulk_end, edge_end, "edge"))
            parts.append(part(q_blk, key, bulk_end, d1, "near"))
        else:
            if edge_end > bulk_end:
                dist = rows[:, None] - torch.arange(bulk_end, edge_end, device=rows.device)[None, :]
                visible = region_mask(rows, bulk_end, edge_end, "bulk", W, key_valid, fm_blk)
                parts.append(
                    two_score_attention(
                        grouped_query[:, :, t0:t1],
                        kg[:, :, bulk_end:edge_end],
                        q_blk,
                        key[:, :, bulk_end:edge_end],
                        value[:, :, bulk_end:edge_end],
                        (dist >= W)[None, None],
                        visible,
                        scale,
                        softcap,
                    )  # fmt: skip
                )
            if i0 > edge_end:
                parts.append(part(q_blk, key, edge_end, min(i0, n_keys), "bulk"))
        if d1 > i0 >= edge_end:
            extra = region_mask(rows, i0, d1, "bulk", W, key_valid, fm_blk)
            parts.append(
                causal_block_with_lse(q_blk, key[:, :, i0:d1], value[:, :, i0:d1], extra, scale, softcap, kernel)
            )
        outputs.append(merge_partials(parts, query.dtype))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _grouped_at_once(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    grouped_query: torch.Tensor,
    grouped_key: torch.Tensor,
    query_start: int,
    W: int,
    scale: float,
    block_size: int,
    kernel: Kernel,
    grouped_needed: int,
) -> torch.Tensor:
    """The block path without padding or custom masks: the grouped part in two large fused calls.

    Query ``i`` sees keys ``j <= i - W`` grouped: for the rows from ``r0 = max(query_start, W)`` that
    is keys ``[0, r0 - W]`` for every row (no mask) and then a square causal band, which is the
    fused kernel's own causal mode shifted by ``W``.  Large calls run the CPU flash kernel at its
    best rate per score (~1.8 ns against ~2.2 ns for 256-row blocks here); only the plain part,
    a band of width ``W``, goes block by block.
    """
    q_len = query.shape[2]
    r0 = max(query_start, W)
    t_first = r0 - query_start  # first local row with any grouped key
    qg = grouped_query[:, :, t_first:]
    full_end = r0 - W + 1  # keys every such row sees grouped
    band = grouped_needed - full_end  # == end - r0 - 1: the causal band's keys beyond the full part
    grouped_parts = []
    if full_end > 0:
        grouped_parts.append(
            attention_with_lse(qg, grouped_key[:, :, :full_end], value[:, :, :full_end], None, scale, None, kernel)
        )
    if band > 0:
        # rows r0+1.. see band keys full_end..: row r0+1+t sees keys full_end..full_end+t (square, causal)
        out_b, lse_b = causal_block_with_lse(
            qg[:, :, 1:], grouped_key[:, :, full_end:grouped_needed], value[:, :, full_end:grouped_needed],
            None, scale, None, kernel,
        )  # fmt: skip
        pad_o = out_b.new_zeros(out_b.shape[0], out_b.shape[1], 1, out_b.shape[3])
        pad_l = lse_b.new_full((lse_b.shape[0], lse_b.shape[1], 1), NEG_INF)
        grouped_parts.append((torch.cat((pad_o, out_b), dim=2), torch.cat((pad_l, lse_b), dim=2)))
    g_out, g_lse = (
        grouped_parts[0]
        if len(grouped_parts) == 1
        else (merge_partials(grouped_parts, torch.float32), _lse_sum(grouped_parts))
    )
    outputs = []
    for t0 in range(0, q_len, block_size):
        t1 = min(q_len, t0 + block_size)
        i0, i1 = query_start + t0, query_start + t1
        q_blk = query[:, :, t0:t1]
        rows = torch.arange(i0, i1, device=query.device)
        near_start = max(0, i0 - W + 1)  # the farthest key some row of the block sees plainly
        edge_end = max(near_start, i1 - W)  # keys before it are plain for some rows only
        parts = []
        if i1 - 1 >= r0:  # rows of the block with grouped keys: the slice of the grouped output
            a = max(t0, t_first)
            o = g_out[:, :, a - t_first : t1 - t_first]
            lse = g_lse[:, :, a - t_first : t1 - t_first]
            if a > t0:
                o = torch.cat((o.new_zeros(*o.shape[:2], a - t0, o.shape[3]), o), dim=2)
                lse = torch.cat((lse.new_full((*lse.shape[:2], a - t0), NEG_INF), lse), dim=2)
            parts.append((o, lse))
        if edge_end > near_start and i0 - W + 1 >= 0 and edge_end - near_start == t1 - t0 - 1 and edge_end < i0:
            # The window's edge is a triangle: row t sees edge key s when s >= t.  Reversed, rows and
            # keys make that the fused kernel's own causal mode (keys [near_start, edge_end] with
            # the first plain-for-all key, so the block is square).
            k0, k1 = near_start, edge_end + 1
            out_e, lse_e = causal_block_with_lse(
                q_blk.flip(2), key[:, :, k0:k1].flip(2), value[:, :, k0:k1].flip(2), None, scale, None, kernel
            )
            parts.append((out_e.flip(2), lse_e.flip(2)))
            edge_end = k1
        elif edge_end > near_start:
            mask = region_mask(rows, near_start, edge_end, "near", W, None, None)
            parts.append(
                attention_with_lse(
                    q_blk, key[:, :, near_start:edge_end], value[:, :, near_start:edge_end], mask, scale, None, kernel
                )
            )
        if i0 > edge_end:
            parts.append(
                attention_with_lse(q_blk, key[:, :, edge_end:i0], value[:, :, edge_end:i0], None, scale, None, kernel)
            )
        parts.append(causal_block_with_lse(q_blk, key[:, :, i0:i1], value[:, :, i0:i1], None, scale, None, kernel))
        outputs.append(merge_partials(parts, query.dtype))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _lse_sum(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The LSE of the union of disjoint key sets: logsumexp of the parts' LSEs."""
    return torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)
