"""SelfExtend over a paged KV cache (vLLM's layout): many sequences of different lengths in one batch.

A serving engine keeps keys and values in fixed-size blocks; each sequence owns a list of block ids
(its row of the *block table*), and a step's queries are packed back to back (``query_start_loc``):
a prefill chunk, a whole prompt or one decode token per sequence, side by side.  Keys are cached
post-RoPE at their true positions, as in transformers, so each sequence is the same problem the rest
of the project solves: queries at positions ``n - q .. n - 1`` over keys ``0 .. n - 1``, whatever part
of them was computed earlier (chunked prefill, prefix-cache hits).

This first version gathers each sequence's blocks into contiguous keys and hands them to
:func:`selfextend_llm.attention.selfextend_attention` (so every exact path, CPU block algorithm or GPU
Triton kernels, is reused as tested).  The gather is a copy of the sequence's K/V per layer and step;
``benchmarks/paged_attention.py`` measures what it costs next to the attention itself.

Cache layout (vLLM's ``LBHNC``, one layer): ``(num_blocks, num_kv_heads, block_size, head_size +
head_size_v)``, keys in the first ``head_size`` channels and values in the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import SelfExtendConfig
from ..rope import Layout


def split_kv(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views of one layer's cache ``(blocks, kv_heads, block_size, head_size + head_size_v)``."""
    return kv_cache[..., :head_size], kv_cache[..., head_size:]


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new tokens' ``key``/``value`` (``tokens, kv_heads, d``) at their slots (``block * size + offset``).

    Slots below zero (padding tokens of a captured batch) are skipped.
    """
    n = slot_mapping.shape[0]
    key, value = key[:n], value[:n]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    block_size = kv_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    head = key.shape[-1]
    kv_cache[blocks, :, offsets, :head] = key.to(kv_cache.dtype)
    kv_cache[blocks, :, offsets, head:] = value.to(kv_cache.dtype)


def gather_sequence(cache: torch.Tensor, block_row: torch.Tensor, n: int) -> torch.Tensor:
    """One sequence's first ``n`` cached rows, contiguous: ``(1, kv_heads, n, d)``."""
    block_size = cache.shape[2]
    used = block_row[: (n + block_size - 1) // block_size].long()
    rows = cache.index_select(0, used)  # (blocks, kv_heads, block_size, d)
    return rows.transpose(0, 1).reshape(1, cache.shape[1], -1, cache.shape[-1])[:, :, :n]


def paged_selfextend_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    *,
    block_table: torch.Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    config_for: Callable[[int], SelfExtendConfig | None],
    inv_freq: torch.Tensor,
    scale: float,
    pretrained_context: int,
    layout: Layout = "half",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """SelfExtend attention for a packed batch of sequences over one layer's paged cache.

    ``query`` (``tokens, heads, d``): the step's queries, sequence after sequence, already rotated to
    their true positions; sequence ``i`` owns rows ``query_start_loc[i]:query_start_loc[i + 1]`` and has
    ``seq_lens[i]`` keys in the cache (its new tokens included).  ``config_for(n)`` gives the grouping of
    a sequence of ``n`` tokens (None: plain causal attention).  Returns (or fills ``out``) ``tokens,
    heads, d``; rows past the last sequence's queries are left as they are.
    """
    from ..attention import selfextend_attention

    head = query.shape[-1]
    key_cache, value_cache = split_kv(kv_cache, head)
    if out is None:
        out = torch.zeros(query.shape[0], query.shape[1], value_cache.shape[-1], dtype=query.dtype, device=query.device)
    for i, n in enumerate(seq_lens):
        start, stop = query_start_loc[i], query_start_loc[i + 1]
        q_len = stop - start
        if q_len <= 0 or n <= 0:
            continue
        key = gather_sequence(key_cache, block_table[i], n)
        value = gather_sequence(value_cache, block_table[i], n)
        q = query[start:stop].transpose(0, 1).unsqueeze(0)  # (1, heads, q_len, d)
        first = n - q_len
        positions = torch.arange(first, n, device=query.device)[None]
        cfg = config_for(n)
        # None: exactly plain causal attention (every key inside the window, no grouping)
        group, window = (1, n + 1) if cfg is None else (cfg.group_size, cfg.neighbor_window)
        result, _ = selfextend_attention(
            q.to(key.dtype),
            key,
            value,
            query_positions=positions,
            query_start=first,
            group_size=group,
            neighbor_window=window,
            inv_freq=inv_freq,
            layout=layout,
            scale=scale,
            log_scale_base=pretrained_context if cfg is not None and cfg.log_scale else None,
        )
        out[start:stop] = result[0].transpose(0, 1).to(out.dtype)
    return out
