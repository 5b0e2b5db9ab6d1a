"""SelfExtend over a paged KV cache (vLLM's layout): many sequences of different lengths in one batch.

A serving engine keeps keys and values in fixed-size blocks; each sequence owns a list of block ids
(its row of the *block table*), and a step's queries are packed back to back (``query_start_loc``):
a prefill chunk, a whole prompt or one decode token per sequence, side by side.  Keys are cached
post-RoPE at their true positions, as in transformers, so each sequence is the same problem the rest
of the project solves: queries at positions ``n - q .. n - 1`` over keys ``0 .. n - 1``, whatever part
of them was computed earlier (chunked prefill, prefix-cache hits).

Decode rows (one query each) of one grouping run on CUDA in one split-K Triton launch that reads keys
and values in place through the block table, rotating grouped keys in registers
(:func:`selfextend_llm.kernels.triton.decode` with ``block_table=``).  Inside a vLLM engine every prefill chunk of
a step (of one grouping) runs in two varlen calls of vLLM's FlashAttention 3, whatever the number of sequences: the
neighbor band as sliding-window attention on the paged cache in place, the grouped part on keys gathered and
re-rotated by one Triton launch, the two merged by LSE (:func:`_prefill_rows_varlen`, :mod:`.triton.varlen`;
checked once against the per-sequence path before it is trusted).  Otherwise, and on the CPU, each sequence's
blocks are gathered into contiguous keys and handed to :func:`selfextend_llm.attention.selfextend_attention` (every
exact path reused as tested); the gather is a copy of the sequence's K/V per layer and step, measured in
``benchmarks/paged_attention.py``.

Cache layout (vLLM's ``LBHNC``, one layer): ``(num_blocks, num_kv_heads, block_size, head_size +
head_size_v)``, keys in the first ``head_size`` channels and values in the rest.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..config import SelfExtendConfig
from ..rope import Layout


def split_kv(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views of one layer's cache ``(blocks, kv_heads, block_size, head_size + head_size_v)``."""
    return kv_cache[..., :head_size], kv_cache[..., head_size:]


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new tokens' ``key``/``value`` (``tokens, kv_heads, d``) at their slots (``block * size + offset``).

    Slots below zero (padding tokens of a captured batch) are skipped.  On CUDA that costs no host sync
    (which would stall every layer of every step): padding rows are sent to slot 0, the engine's null
    block that no sequence reads, and write back what is already there.
    """
    n = slot_mapping.shape[0]
    key, value = key[:n], value[:n]
    keep = slot_mapping >= 0
    on_gpu = kv_cache.device.type == "cuda"
    if on_gpu:
        slot_mapping = slot_mapping.clamp_min(0)
    elif not bool(keep.all()):
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    block_size = kv_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    if on_gpu:
        old = kv_cache[blocks, :, offsets]  # (tokens, kv_heads, head_size + head_size_v)
        new = torch.cat([key.to(kv_cache.dtype), value.to(kv_cache.dtype)], dim=-1)
        kv_cache[blocks, :, offsets] = torch.where(keep[:, None, None], new, old)
        return
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
    batch_decodes: bool | None = None,
    step_cache: dict | None = None,
    varlen_attention: Callable | None | bool = None,
) -> torch.Tensor:
    """SelfExtend attention for a packed batch of sequences over one layer's paged cache.

    ``query`` (``tokens, heads, d``): the step's queries, sequence after sequence, already rotated to
    their true positions; sequence ``i`` owns rows ``query_start_loc[i]:query_start_loc[i + 1]`` and has
    ``seq_lens[i]`` keys in the cache (its new tokens included).  ``config_for(n)`` gives the grouping of
    a sequence of ``n`` tokens (None: plain causal attention).  Returns (or fills ``out``) ``tokens,
    heads, d``; rows past the last sequence's queries are left as they are.  ``batch_decodes``: run the
    one-token rows in one Triton launch (default: on CUDA; True also in Triton's interpreter, for tests).
    ``step_cache``: a dict that lives for one engine step (every layer passes the same one), where the
    batch's index and length tensors are made once instead of once per layer (each is a host-to-device copy).
    ``varlen_attention``: a varlen attention function with FlashAttention's ``flash_attn_varlen_func`` signature
    (paged keys, sliding window, row LSE) that runs every prefill chunk of one grouping in two calls
    (:func:`_prefill_rows_varlen`); default: vLLM's FlashAttention 3 where vLLM is imported and the queries are
    half precision on CUDA; False: never.  It is checked against the per-sequence path once before it is trusted.
    """
    head = query.shape[-1]
    key_cache, value_cache = split_kv(kv_cache, head)
    if out is None:
        out = torch.zeros(query.shape[0], query.shape[1], value_cache.shape[-1], dtype=query.dtype, device=query.device)
    step = _Step(
        query, key_cache, value_cache, block_table, seq_lens, query_start_loc, config_for, inv_freq, scale,
        pretrained_context, layout, out,
    )  # fmt: skip
    step_cache = {} if step_cache is None else step_cache
    together = query.device.type == "cuda" if batch_decodes is None else batch_decodes
    done = _decode_rows_together(step, step_cache) if together else set()
    fa = _varlen_function(query, inv_freq, layout, varlen_attention)
    if fa is not None:
        done |= _prefill_rows_checked(fa, step, step_cache, done)
    for i in range(len(seq_lens)):
        if i not in done:
            _one_sequence(step, i)
    return out


class _Step(NamedTuple):
    """One layer's call, as every path of :func:`paged_selfextend_attention` reads it: the step's packed queries,
    the cache's key and value views, the batch, the grouping and RoPE inputs, and the output rows to fill."""

    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: list[int]
    query_start_loc: list[int]
    config_for: Callable[[int], SelfExtendConfig | None]
    inv_freq: torch.Tensor
    scale: float
    pretrained_context: int
    layout: Layout
    out: torch.Tensor


def _one_sequence(step: _Step, i: int) -> None:
    """Sequence ``i`` of the step on its own: its keys gathered, then the tested single-sequence paths."""
    from ..attention import selfextend_attention

    query, key_cache, value_cache, block_table, seq_lens, query_start_loc, config_for, inv_freq, scale, \
        pretrained_context, layout, out = step  # fmt: skip
    n = seq_lens[i]
    start, stop = query_start_loc[i], query_start_loc[i + 1]
    q_len = stop - start
    if q_len > 0 and n > 0:
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
            log_scaling=None if cfg is None else cfg.log_scaling(pretrained_context),
        )
        out[start:stop] = result[0].transpose(0, 1).to(out.dtype)


def _varlen_function(
    query: torch.Tensor, inv_freq: torch.Tensor, layout: Layout, choice: Callable | None | bool
) -> Callable | None:
    """The varlen attention function the step's prefill chunks run on, or None for the per-sequence loop."""
    from . import triton as triton_kernels
    from .lse import _fa3_function

    if choice is False or (choice is None and not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16))):
        return None
    if choice is None or choice is True:
        choice = _fa3_function()
    dim = query.shape[-1]
    if choice is None or layout != "half" or not triton_kernels.available(query.device):
        return None
    if not triton_kernels.supports(dim, 2 * inv_freq.shape[-1], layout, query.dtype):
        return None
    return choice


#: (function, dtype, heads, kv heads, head size, block size) of varlen functions that matched the per-sequence path
#: on a step of their own, and of those that did not (never used again in this process).
_VARLEN_TRUSTED: set[tuple] = set()
_VARLEN_FAILED: set[tuple] = set()


def _prefill_rows_checked(fa: Callable, step: _Step, step_cache: dict, done: set[int]) -> set[int]:
    """:func:`_prefill_rows_varlen`, trusted only once its first step matched the per-sequence path row for row.

    The varlen function comes from another package (vLLM's FlashAttention 3: its paged layout, window and LSE
    conventions are assumed here); on a mismatch or an error it is dropped with a warning and the step's answer
    is the per-sequence one, so a changed API costs speed, never wrong tokens.
    """
    import warnings

    query, key_cache, out = step.query, step.key_cache, step.out
    key = (fa, query.dtype, query.shape[1], key_cache.shape[1], query.shape[-1], key_cache.shape[2])
    if key in _VARLEN_FAILED:
        return set()
    if key in _VARLEN_TRUSTED:
        return _prefill_rows_varlen(fa, step, step_cache, done)
    trial = out.clone()
    try:
        ran = _prefill_rows_varlen(fa, step._replace(out=trial), step_cache, done)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - another package's kernel: any failure means the loop
        warnings.warn(f"varlen prefill attention not used ({type(err).__name__}: {err})", stacklevel=3)
        _VARLEN_FAILED.add(key)
        return set()
    if not ran:
        return ran
    for i in ran:
        _one_sequence(step, i)
    starts = step.query_start_loc
    rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in sorted(ran)]).to(out.device)
    got, want = trial.index_select(0, rows).float(), out.index_select(0, rows).float()
    tol = 1e-4 if query.dtype == torch.float32 else 4e-2
    if bool(((got - want).abs().max() <= tol).item()):
        _VARLEN_TRUSTED.add(key)
    else:
        warnings.warn(
            f"varlen prefill attention not used: it differs from the per-sequence path by "
            f"{(got - want).abs().max().item():.3g} (more than {tol})", stacklevel=3,
        )  # fmt: skip
        _VARLEN_FAILED.add(key)
    return ran


class _PrefillPlan(NamedTuple):
    """A step's prefill chunks of one grouping, packed for two varlen calls (made once per step, on the host)."""

    rows: list[int]  # the sequences
    group: int
    window: int  # keys less than this far back are the band (past every key: plain causal, no grouped part)
    factor: torch.Tensor | None  # log-scaling factor of each packed query row (float32), None: off
    src: torch.Tensor  # each packed query row's row in the step's packed query / output
    positions: torch.Tensor  # its true position
    grouped_row: torch.Tensor  # its row among the grouped queries, -1 where it has no grouped keys
    cu_q: torch.Tensor  # int32 (sequences + 1)
    lengths: torch.Tensor  # int32: keys of each sequence
    block_table: torch.Tensor  # the sequences' block-table rows
    cu_qg: torch.Tensor  # int32, sequences that have grouped keys
    cu_kg: torch.Tensor
    key_seq: torch.Tensor  # each grouped key row's sequence (its row of ``block_table``)
    key_positions: torch.Tensor  # and its position
    max_q: int
    max_k: int
    n_grouped: int
    max_qg: int
    max_kg: int


def _prefill_plans(
    seq_lens: list[int],
    query_start_loc: list[int],
    config_for: Callable[[int], SelfExtendConfig | None],
    block_table: torch.Tensor,
    pretrained_context: int,
    done: set[int],
    device: torch.device,
) -> list[_PrefillPlan]:
    """The step's sequences of more than one query row, one plan per grouping.

    The per-sequence numbers (a few per sequence) are worked out on the host and copied once; the per-token
    index rows (tens of thousands at a 64k step) are made on ``device`` from them, with no host sync."""
    from ..rope import log_scale_factor

    by_config: dict[SelfExtendConfig | None, list[int]] = {}
    for i, n in enumerate(seq_lens):
        if i not in done and n > 0 and query_start_loc[i + 1] - query_start_loc[i] > 1:
            by_config.setdefault(config_for(n), []).append(i)
    plans = []
    for cfg, rows in by_config.items():
        ns = [seq_lens[i] for i in rows]
        # plain causal: a window past every key (no grouped part, no sliding window on the band)
        group, window = (1, max(ns) + 1) if cfg is None else (cfg.group_size, cfg.neighbor_window)
        q_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in rows]
        # queries at positions n - q .. n - 1; those at window or later have grouped keys 0 .. n - window - 1
        q_grouped = [min(q, max(0, n - max(window, n - q))) for n, q in zip(ns, q_lens, strict=True)]
        kept = [r for r, g in enumerate(q_grouped) if g > 0]
        k_grouped = [ns[r] - window for r in kept]
        cu_q, cu_qg, cu_kg = (list(itertools.accumulate(x, initial=0)) for x in (q_lens, [q_grouped[r] for r in kept],
                                                                                    k_grouped))  # fmt: skip
        small = [[query_start_loc[i] for i in rows], [n - q for n, q in zip(ns, q_lens, strict=True)], q_lens, cu_q,
                 ns, cu_qg, cu_kg, kept, k_grouped]  # fmt: skip
        flat = torch.tensor([v for part in small for v in part], dtype=torch.int32).to(device, non_blocking=True)
        starts, firsts, q_lens_d, cu_q_d, lengths, cu_qg_d, cu_kg_d, kept_d, k_grouped_d = flat.split(
            [len(part) for part in small]
        )
        total_q, total_kg = cu_q[-1], cu_kg[-1]
        seq = torch.repeat_interleave(torch.arange(len(rows), device=device), q_lens_d, output_size=total_q)
        within = torch.arange(total_q, device=device, dtype=torch.int32) - cu_q_d[seq]
        src, positions = starts[seq] + within, firsts[seq] + within
        has_grouped = positions >= window
        grouped_row = torch.where(has_grouped, has_grouped.cumsum(0, dtype=torch.int32) - 1, -1)
        key_seq = torch.repeat_interleave(kept_d, k_grouped_d, output_size=total_kg)
        key_positions = torch.arange(total_kg, device=device, dtype=torch.int32) - torch.repeat_interleave(
            cu_kg_d[:-1], k_grouped_d, output_size=total_kg
        )
        scaling = None if cfg is None else cfg.log_scaling(pretrained_context)
        factor = None if scaling is None else log_scale_factor(positions[None], scaling, torch.float32).reshape(-1)
        plans.append(_PrefillPlan(
            rows, group, window, factor, src, positions, grouped_row, cu_q_d, lengths, block_table[rows], cu_qg_d,
            cu_kg_d, key_seq, key_positions, max(q_lens), max(ns), cu_qg[-1], max(q_grouped),
            max(k_grouped, default=0),
        ))  # fmt: skip
    return plans


def _prefill_rows_varlen(fa: Callable, step: _Step, step_cache: dict, done: set[int]) -> set[int]:
    """Every prefill chunk of the step, one grouping at a time, in two varlen calls of ``fa`` and three Triton
    launches (:mod:`.triton.varlen`); returns the sequences it did.

    The band (keys less than ``W`` back, true positions) reads the paged cache in place with a sliding window; the
    grouped part (keys ``0 .. t - W``, grouped positions) is bottom-right causal attention between the packed
    grouped queries and the sequences' grouped keys ``0 .. n - W - 1``; the two merge by their LSEs.
    """
    from .triton import varlen

    query = step.query
    if "prefill" not in step_cache:
        step_cache["prefill"] = _prefill_plans(
            step.seq_lens, step.query_start_loc, step.config_for, step.block_table, step.pretrained_context, done,
            query.device,
        )  # fmt: skip
    inv = step.inv_freq.to(device=query.device, dtype=torch.float32).contiguous()
    ran: set[int] = set()
    for plan in step_cache["prefill"]:
        band_queries, grouped_queries = varlen.pack_queries(
            query, plan.src, plan.positions, plan.grouped_row, plan.n_grouped, group_size=plan.group,
            neighbor_window=min(plan.window, plan.max_k + 1), inv_freq=inv, factor=plan.factor,
        )  # fmt: skip
        band = varlen_band(fa, plan, band_queries, step.key_cache, step.value_cache, step.scale)
        grouped = (band_queries[:0], band[1][:, :0])
        if plan.n_grouped:
            keys, values = varlen.pack_grouped_kv(
                step.key_cache, step.value_cache, plan.block_table, plan.key_seq, plan.key_positions,
                group_size=plan.group, inv_freq=inv,
            )  # fmt: skip
            grouped = varlen_grouped(fa, plan, grouped_queries, keys, values, step.scale)
        varlen.merge_into(step.out, plan.src, band, grouped, plan.grouped_row)
        ran.update(plan.rows)
    return ran


def varlen_band(
    fa: Callable, plan: _PrefillPlan, queries: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The band of a prefill plan (keys less than ``W`` back): sliding-window causal attention on the paged cache
    in place, with the row LSE ``(heads, rows)``; no window where ``W`` covers every key (plain causal)."""
    window = plan.window - 1 if plan.window <= plan.max_k else -1
    return fa(
        queries, key_cache.transpose(1, 2), value_cache.transpose(1, 2), max_seqlen_q=plan.max_q,
        cu_seqlens_q=plan.cu_q, max_seqlen_k=plan.max_k, seqused_k=plan.lengths, block_table=plan.block_table,
        softmax_scale=scale, causal=True, window_size=[window, 0], return_softmax_lse=True, fa_version=3,
    )  # fmt: skip


def varlen_grouped(
    fa: Callable, plan: _PrefillPlan, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouped part of a prefill plan: bottom-right causal attention between its packed grouped queries and
    each sequence's grouped keys ``0 .. n - W - 1``, with the row LSE."""
    return fa(
        queries, keys, values, max_seqlen_q=plan.max_qg, cu_seqlens_q=plan.cu_qg, max_seqlen_k=plan.max_kg,
        cu_seqlens_k=plan.cu_kg, softmax_scale=scale, causal=True, return_softmax_lse=True, fa_version=3,
    )  # fmt: skip


class _DecodePlan(NamedTuple):
    """A step's one-token rows of one grouping, as the batched decode launch takes them (made once per step)."""

    rows: list[int]
    config: SelfExtendConfig
    lengths: torch.Tensor  # int32, one per row: its keys so far
    index: torch.Tensor  # each row's place in the packed query / output
    positions: torch.Tensor  # (rows, 1): the query's true position, lengths - 1
    offsets: torch.Tensor  # zeros: every row's keys start at its block table's first entry
    block_table: torch.Tensor  # the rows' block-table rows
    longest: int


def _decode_rows_together(step: _Step, step_cache: dict) -> set[int]:
    """On CUDA, every one-token row of one grouping in a single split-K Triton launch that reads the keys in
    place through the block table (each row's length from a tensor); returns the rows it did."""
    from ..rope import log_scale
    from . import triton as triton_kernels

    query, key_cache, value_cache, block_table, seq_lens, query_start_loc, config_for, inv_freq, scale, \
        pretrained_context, layout, out = step  # fmt: skip
    dim = query.shape[-1]
    if not (triton_kernels.available(query.device) and triton_kernels.supports(dim, 2 * inv_freq.shape[-1], layout,
                                                                               query.dtype)):  # fmt: skip
        return set()
    if "decode" not in step_cache:
        rows = [i for i, n in enumerate(seq_lens) if n > 0 and query_start_loc[i + 1] - query_start_loc[i] == 1]
        configs = {config_for(seq_lens[i]) for i in rows}
        if not rows or len(configs) != 1 or None in configs:
            step_cache["decode"] = None
        else:
            lengths = torch.tensor([seq_lens[i] for i in rows], dtype=torch.int32).to(query.device, non_blocking=True)
            index = torch.tensor([query_start_loc[i] for i in rows]).to(query.device, non_blocking=True)
            step_cache["decode"] = _DecodePlan(
                rows, configs.pop(), lengths, index, (lengths.long() - 1)[:, None], torch.zeros_like(lengths),
                block_table[rows], max(seq_lens[i] for i in rows),
            )  # fmt: skip
    plan: _DecodePlan | None = step_cache["decode"]
    if plan is None:
        return set()
    cfg = plan.config
    q = query.index_select(0, plan.index).unsqueeze(2)  # (rows, heads, 1, d)
    q = log_scale(q, plan.positions, cfg.log_scaling(pretrained_context))
    # the kernel reads each row's keys in place through its block-table row: no gathered copy
    result = triton_kernels.decode(
        q, key_cache, value_cache, offsets=plan.offsets, group_size=cfg.group_size,
        neighbor_window=cfg.neighbor_window, inv_freq=inv_freq, scale=scale, lengths=plan.lengths,
        block_table=plan.block_table, max_length=plan.longest,
    )  # fmt: skip
    out.index_copy_(0, plan.index, result[:, :, 0].to(out.dtype))
    return set(plan.rows)


def warm_up(
    *,
    heads: int,
    kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    table_width: int,
    config: SelfExtendConfig,
    inv_freq: torch.Tensor,
    scale: float,
    pretrained_context: int,
    batch_decodes: bool | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Run once every kernel variant a serving step can need, on a scratch cache; the steps it ran
    (``seq_lens``, ``query_start_loc``).

    Triton compiles a kernel variant the first time it meets it (seconds each for the prefill kernels), so without
    this a fresh server compiled mid-traffic: the first chunked prefill, the first lone decode row.  The steps here
    have a whole prompt past the window, a prefill chunk, two decode rows together (the batched paged launch) and
    one alone, with the real head layout, dtype, cache block size and block-table width (strides are specialised
    by their divisibility, so they must match the engine's).
    """
    W = config.neighbor_window
    n = W + 2 * block_size + 5  # past the window: every grouped path runs
    used = -(-n // block_size)
    if used + 1 > table_width:
        raise ValueError(f"block table of {table_width} blocks is too narrow for a {n}-token warm-up sequence")
    g = torch.Generator(device=device).manual_seed(0)
    cache = torch.randn(used + 1, kv_heads, block_size, 2 * head_size, generator=g, device=device).to(dtype)
    row = torch.zeros(table_width, dtype=torch.int32, device=device)
    row[:used] = torch.arange(1, used + 1, dtype=torch.int32, device=device)  # block 0 is the engine's null block
    steps = [
        ([n, n, n, n], [0, n, n + 7, n + 8, n + 9]),  # whole prompt, chunk of 7, two decode rows
        ([n], [0, 1]),  # a lone decode row (the batched launch too: no gathered copy of its keys)
    ]
    for seq_lens, starts in steps:
        query = torch.randn(starts[-1], heads, head_size, generator=g, device=device).to(dtype)
        paged_selfextend_attention(
            query, cache, block_table=row.expand(len(seq_lens), -1).contiguous(), seq_lens=seq_lens,
            query_start_loc=starts, config_for=lambda _n: config, inv_freq=inv_freq.to(device), scale=scale,
            pretrained_context=pretrained_context, batch_decodes=batch_decodes, step_cache={},
        )  # fmt: skip
    return steps
