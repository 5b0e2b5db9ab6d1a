"""SelfExtend under a static (preallocated) KV cache: tensor-only decoding that compiles.

transformers' static cache keeps ``max_cache_len`` key slots per layer, zeros past the current
length, and hands the attention every slot.  Where the queries stand is then data, not shape:
the mask function (:func:`selfextend_llm.hf.attention.selfextend_mask`) describes it as a *key row*, a boolean
``(b, 1, 1, n)`` tensor that is True for every slot that holds a real key of the sequence so far.
Everything here reads positions from tensors, so a decode step has no host sync, no
data-dependent Python branch and fixed shapes: ``torch.compile(fullgraph=True)`` and CUDA graphs
capture it.

On a GPU the step is the split-K Triton decode kernel (:func:`.triton.decode`, grouped
keys rotated in registers), told each row's length by a tensor and registered as the opaque
custom op ``selfextend::static_decode`` so that the compiler keeps it whole.  Elsewhere (the CPU,
softcapping, other RoPE layouts) grouped keys are kept in a buffer of the static cache's shape
(:class:`StaticGroupedKeys`), written once per token at the token's cache slot, as the static
cache writes its own keys, and a decode step is two fused attention calls with the row
log-sum-exp, merged exactly:

* the grouped part: the grouped query against every grouped key, masked to slots at least ``W``
  behind the query (and not padding);
* the neighbor part: the query at its true position against the ``W`` keys gathered just behind
  it (fixed size, so no slicing by a tensor length).

Keys past the current length are never visible: the key row hides them in both parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch

from ..config import LogScale
from ..rope import Layout, grouped_key_position, grouped_query_position, log_scale, rotate
from . import triton as triton_kernels
from .lse import Kernel, attention_with_lse, merge_partials


@torch.library.custom_op("selfextend::static_decode", mutates_args=())
def triton_static_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    key_valid: torch.Tensor,
    inv_freq: torch.Tensor,
    group_size: int,
    neighbor_window: int,
    scale: float,
) -> torch.Tensor:
    """The Triton split-K decode kernel over a static cache, as one opaque op for the compiler."""
    return triton_kernels.decode(
        query, key, value, offsets=offsets, group_size=group_size, neighbor_window=neighbor_window,
        inv_freq=inv_freq, scale=scale, key_valid=key_valid, lengths=lengths,
    )  # fmt: skip


@triton_static_decode.register_fake
def _(query, key, value, offsets, lengths, key_valid, inv_freq, group_size, neighbor_window, scale):
    return torch.empty_like(query)


def triton_decodes(
    query: torch.Tensor, inv_freq: torch.Tensor, layout: Layout, softcap: float | None, backend: str
) -> bool:
    """Whether a static decode step runs on the Triton kernel (then no grouped-key mirror is kept)."""
    return (
        backend in ("auto", "triton", "split")
        and softcap is None
        and query.device.type == "cuda"
        and not query.requires_grad
        and triton_kernels.available(query.device)
        and triton_kernels.supports(query.shape[-1], 2 * inv_freq.shape[-1], layout, query.dtype)
    )


def is_key_row(mask: object, q_len: int) -> bool:
    """Whether ``mask`` is a key row: a 4-D boolean mask with one row for all queries.

    For a single query this is also exactly the causal-and-padding mask SDPA would get, so a
    one-row mask from any mask builder means the same thing.
    """
    return isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.dtype == torch.bool and mask.shape[2] == 1


def last_visible(key_row: torch.Tensor) -> torch.Tensor:
    """Cache slot of each row's newest key (``b``): the query's own slot when decoding."""
    slots = torch.arange(key_row.shape[-1], device=key_row.device)
    return torch.where(key_row[:, 0, 0, :], slots, -1).amax(dim=-1)


def sequence_end(key_row: torch.Tensor) -> int:
    """Slots ``[0, end)`` hold the sequence so far (eager only: reading it is a host sync)."""
    return int(last_visible(key_row).max()) + 1


@dataclass
class StaticGroupedKeys:
    """Keys rotated to grouped positions, one slot per static-cache slot, for one layer.

    ``owner`` is the data pointer of the static key tensor this buffer mirrors: a call that
    brings another cache (a new ``generate``) rebuilds the buffer instead of reusing stale keys.
    """

    keys: torch.Tensor
    owner: int
    group_size: int


def new_mirror(key: torch.Tensor, group_size: int) -> StaticGroupedKeys:
    """An empty grouped-key mirror of the static key tensor ``key`` (filled as slots are written)."""
    buffer = torch.zeros_like(key)
    if not torch.compiler.is_compiling():
        # a fixed address, like the static cache's own tensors: CUDA graphs replay in place
        torch._dynamo.mark_static_address(buffer)
    return StaticGroupedKeys(keys=buffer, owner=key.data_ptr(), group_size=group_size)


def decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_row: torch.Tensor,
    positions: torch.Tensor,
    grouped: torch.Tensor | None,
    *,
    group_size: int,
    neighbor_window: int,
    inv_freq: torch.Tensor,
    layout: Layout,
    scale: float,
    log_scaling: LogScale | None = None,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One SelfExtend decode step over a static cache, with tensor-only control flow.

    ``query`` is ``(b, h, 1, d)`` at RoPE ``positions`` (``b, 1``); ``key``/``value`` are the
    static cache's ``(b, kv_h, n, d)`` tensors with the new key already written; ``key_row``
    (``b, 1, 1, n``) marks the real keys so far.  The new key is rotated to its grouped position
    and written into ``grouped`` (``b, kv_h, n, d``) in place; on the Triton path (see
    :func:`triton_decodes`) ``grouped`` is not needed and may be None.  Returns ``(b, h, 1, d)``.
    """
    bsz, heads, _, dim = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    G, W = group_size, min(neighbor_window, n)
    pos = positions[:, -1:]  # (b, 1)
    slot = last_visible(key_row)  # (b,): the query's own slot
    if triton_decodes(query, inv_freq, layout, softcap, backend):
        query = log_scale(query, pos, log_scaling)
        return triton_static_decode(
            query, key, value, slot - pos[:, 0], slot + 1, key_row[:, 0, 0, :], inv_freq, G, neighbor_window, scale
        )
    if grouped is None:
        raise ValueError("decode_step needs the grouped-key buffer off the Triton path")

    # The new key, rotated to its grouped position, into the grouped buffer at its slot.
    at = slot[:, None, None, None].expand(bsz, kv_heads, 1, dim)
    new_key = key.gather(2, at)
    grouped.scatter_(2, at, rotate(new_key, grouped_key_position(pos, G) - pos, inv_freq, layout))

    query = log_scale(query, pos, log_scaling)
    grouped_query = rotate(query, grouped_query_position(pos, G, neighbor_window) - pos, inv_freq, layout)

    visible = key_row[:, 0, 0, :]  # (b, n)
    slots = torch.arange(n, device=key.device)
    far = visible & (slots[None, :] <= (slot - neighbor_window)[:, None])
    kernel: Kernel = "math" if softcap is not None else backend if backend in get_args(Kernel) else "auto"
    grouped_part = attention_with_lse(grouped_query, grouped, value, far[:, None, None, :], scale, softcap, kernel)

    near_slots = slot[:, None] - (W - 1) + torch.arange(W, device=key.device)  # (b, W), oldest first
    in_cache = near_slots >= 0
    near_slots = near_slots.clamp(min=0)
    near_mask = in_cache & visible.gather(1, near_slots)
    take = near_slots[:, None, :, None].expand(bsz, kv_heads, W, dim)
    near_part = attention_with_lse(
        query, key.gather(2, take), value.gather(2, take), near_mask[:, None, None, :], scale, softcap, kernel
    )
    return merge_partials([grouped_part, near_part], query.dtype)
