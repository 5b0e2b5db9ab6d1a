"""The SelfExtend attention math, as pure functions on tensors.

Queries and keys arrive already rotated to their true positions (transformers applies RoPE
before caching).  For a query at cache index ``i`` and a key at ``j``:

* ``i - j < W`` (neighbor window): the plain score ``q(p_i) . k(p_j)``;
* ``i - j >= W``: the grouped score ``q(p_i // G + W - W // G) . k(p_j // G)``.

Both kinds of score share one softmax.  Instead of two ``n x n`` score matrices, each block of
queries is attended in up to three key ranges, each through a fused kernel that returns the
row log-sum-exp, and the parts are merged exactly (:func:`backends.merge_partials`):

1. keys every query of the block sees grouped (no mask but padding),
2. keys at the window edge, seen grouped by some queries of the block (small mask),
3. keys inside the window of some query of the block (plain rotation, band mask).

Memory per block is ``block x (block + W)`` mask entries, never ``n x n``.

On CUDA the same math runs as one fused Triton kernel per call (:mod:`triton_attention`):
both score kinds share one online softmax, queries (and, when decoding, keys) are rotated to
grouped positions in registers.  The block path here serves the CPU, softcapping, custom masks
and other layouts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import flex, split_prefill, triton_attention
from .backends import NEG_INF, NoFusedCausalKernel, attention_with_lse, merge_partials
from .rope import Layout, grouped_key_position, grouped_query_position, log_scale_factor, rotate

#: Query rows per block. Small blocks keep the masked (window-edge) work small: on CPU at 8k tokens,
#: 128 rows cost 1.28x plain SDPA against 1.51x for 1024 (see BENCHMARKS.md).
DEFAULT_BLOCK_SIZE = 128
#: Prefill chunks at least this long use the flex_attention path on CUDA.
FLEX_MIN_QUERIES = 128


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


def _use_triton(
    backend: str,
    query: torch.Tensor,
    inv_freq: torch.Tensor,
    layout: Layout,
    full_mask: torch.Tensor | None,
    softcap: float | None,
) -> bool:
    """The fused Triton kernels run by default on CUDA, and on request (interpreter) elsewhere."""
    if backend not in ("auto", "triton", "split"):
        return False
    fits = (
        full_mask is None
        and softcap is None
        and not query.requires_grad
        and triton_attention.available(query.device)
        and triton_attention.supports(query.shape[-1], 2 * inv_freq.shape[-1], layout, query.dtype)
    )
    if backend in ("triton", "split") and not fits:
        raise ValueError(
            f"backend {backend!r} needs a CUDA device (or TRITON_INTERPRET=1), the 'half' RoPE layout with full "
            "rotary, a power-of-two head dim, no softcapping and no custom mask; use backend='auto'"
        )
    return fits and (backend != "auto" or query.device.type == "cuda")


def _triton_attention(query, key, value, offsets, query_start, G, W, inv_freq, scale, key_valid, backend):
    """The GPU kernels: split-K decoding (keys rotated in registers, no grouped cache needed);
    a whole unpadded half-precision prefill split into a fused-SDPA grouped part and a Triton
    neighbor band; else (chunks, padding, float32, ``backend="triton"``) the one-pass prefill."""
    n_keys = query_start + query.shape[2]  # keys past the last query are never visible
    key, value = key[:, :, :n_keys], value[:, :, :n_keys]
    key_valid = None if key_valid is None else key_valid[:, :n_keys]
    args = dict(offsets=offsets, group_size=G, neighbor_window=W, inv_freq=inv_freq, scale=scale)
    if query.shape[2] == 1:
        return triton_attention.decode(query, key, value, key_valid=key_valid, **args)
    whole = query_start == 0 and key_valid is None
    if whole and (backend == "split" or (backend == "auto" and query.dtype != torch.float32)):
        try:
            return split_prefill.prefill_split(query, key, value, **args)
        except NoFusedCausalKernel:
            pass  # e.g. a GPU without cuDNN/FlashAttention-2 kernels for this shape: the one-pass kernel

    args["key_valid"] = key_valid
    grouped = triton_attention.rotate_keys_to_groups(key, offsets, G, inv_freq)
    return triton_attention.prefill(query, key, value, grouped, query_start=query_start, **args)


def selfextend_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    query_positions: torch.Tensor,
    query_start: int,
    group_size: int,
    neighbor_window: int,
    inv_freq: torch.Tensor,
    layout: Layout = "half",
    scale: float,
    key_valid: torch.Tensor | None = None,
    full_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    log_scale_base: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    key_cache: GroupedKeyCache | None = None,
    backend: str = "auto",
    grouped_buffer: torch.Tensor | None = None,
    memo: dict | None = None,
) -> tuple[torch.Tensor, GroupedKeyCache | None]:
    """SelfExtend attention of ``query`` (``b, h, q, d``) over cached ``key``/``value`` (``b, kv_h, n, d``).

    ``query_positions`` (``b, q``) are the RoPE positions the queries were rotated to;
    ``query_start`` is the cache index of the first query.  ``key_valid`` (``b, n``) marks real
    (non-padding) keys; ``full_mask`` (``b|1, 1, q, n``) is an arbitrary extra boolean mask.
    Returns the output (``b, h, q, d``) and the grouped-key cache to keep for the next step.
    ``grouped_buffer`` (``b, kv_h, >= n, d``) receives the grouped keys when they are rotated
    afresh: a static cache's mirror, kept slot for slot for the decode steps.  ``memo``: one dict
    per forward pass, shared by its layers, for what depends on positions only (rotation tables,
    log-scaling factors).
    """
    bsz, _, q_len, _ = query.shape
    n_keys = key.shape[2]
    G, W = group_size, neighbor_window
    if query_positions.shape[0] != bsz:
        query_positions = query_positions.expand(bsz, -1)
    if log_scale_base is not None:
        memo_key = ("log", log_scale_base, query.dtype, tuple(query_positions.shape))
        factor = None if memo is None else memo.get(memo_key)
        if factor is None:
            factor = log_scale_factor(query_positions, log_scale_base, query.dtype)
            if memo is not None:
                memo[memo_key] = factor
        query = query * factor
    if _use_triton(backend, query, inv_freq, layout, full_mask, softcap):
        offsets = row_offsets(query_positions, query_start)
        try:
            out = _triton_attention(query, key, value, offsets, query_start, G, W, inv_freq, scale, key_valid, backend)
            return out, None
        except triton_attention.OutOfResources as err:
            if backend != "auto":
                raise
            warnings.warn(
                f"SelfExtend's Triton kernels do not fit this GPU for this shape ({err}); using flex_attention",
                stacklevel=2,
            )
            triton_attention.disable(query.shape[-1], query.dtype)
    k_pos, offsets = key_positions(query_positions, query_start, n_keys)

    last_index = query_start + q_len - 1
    grouped_needed = max(0, min(n_keys, last_index - W + 1))
    # Keep grouped keys for every key the next step's queries may see grouped.
    cache_upto = min(n_keys, last_index + 1)
    kg, new_cache = (
        grouped_keys(key, k_pos, offsets, cache_upto, G, inv_freq, layout, key_cache, query_start, grouped_buffer, memo)
        if cache_upto > 0
        else (key[:, :, :0], None)
    )
    if (
        last_index < W
        and query_start == 0
        and key_valid is None
        and full_mask is None
        and softcap is None
        and backend == "auto"
        and q_len > 1
    ):
        # Every key is inside every query's window: exactly plain causal attention, in one fused call
        # (short prompts on models whose tuned window covers them pay nothing for SelfExtend).
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key[:, :, :q_len], value[:, :, :q_len], is_causal=True, scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )  # fmt: skip
        return out, new_cache

    gq_shift = grouped_query_position(query_positions, G, W) - query_positions

    if q_len == 1 and backend == "auto" and full_mask is None and softcap is None and query.device.type == "cpu":
        qg = rotate(query, gq_shift, inv_freq, layout, memo, f"q{G}:{W}")
        return decode_explicit(query, qg, key, kg, value, grouped_needed, key_valid, scale), new_cache

    if (
        backend in ("auto", "flex")
        and q_len >= FLEX_MIN_QUERIES
        and full_mask is None
        and softcap is None
        and flex.available(query.device)
    ):
        out = flex.flex_selfextend(
            query,
            key,
            value,
            rotate(query, gq_shift, inv_freq, layout),
            kg,
            query_start=query_start,
            neighbor_window=W,
            key_valid=key_valid,
            scale=scale,
        )
        return out, new_cache

    if backend in ("flex", "triton", "split"):
        backend = "auto"  # the block path below picks its per-block kernel itself
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
            qg = rotate(q_blk, gq_shift[:, t0:t1], inv_freq, layout)
            if bulk_end > 0:
                parts.append(
                    attention_with_lse(
                        qg,
                        kg[:, :, :bulk_end],
                        value[:, :, :bulk_end],
                        region_mask(rows, 0, bulk_end, "bulk", W, key_valid, fm_blk),
                        scale,
                        softcap,
                        backend,
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
                        backend,
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
                backend,
            )
        )
        outputs.append(merge_partials(parts, query.dtype))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out, new_cache
