"""GPU prefill: SelfExtend as two block-sparse ``flex_attention`` passes merged by log-sum-exp.

The neighbor pass only visits key blocks inside the window band and the grouped pass only
blocks beyond it, so together they touch about as many blocks as one causal attention (plus
the blocks straddling the window edge).  Mask parameters are captured as tensors, not Python
numbers, so a new window or offset does not trigger a recompile.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _kernels():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return torch.compile(flex_attention, dynamic=None), create_block_mask


_MASKS: dict[tuple, tuple] = {}


def available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        _kernels()
    except Exception:  # older torch without flex_attention
        return False
    return True


def flex_selfextend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    grouped_query: torch.Tensor,
    grouped_key: torch.Tensor,
    *,
    query_start: int,
    neighbor_window: int,
    key_valid: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """SelfExtend attention for one prefill chunk; all keys up to the last query are visible causally."""
    from .backends import merge_partials

    flex, create_block_mask = _kernels()
    bsz, _, q_len, _ = query.shape
    n = grouped_key.shape[2]
    key, value = key[:, :, :n], value[:, :, :n]
    start = torch.tensor(query_start, device=query.device)
    window = torch.tensor(neighbor_window, device=query.device)
    valid = key_valid[:, :n] if key_valid is not None else None

    def near(b, h, q_idx, kv_idx):
        dist = q_idx + start - kv_idx
        ok = (dist >= 0) & (dist < window)
        return ok & valid[b, kv_idx] if valid is not None else ok

    def far(b, h, q_idx, kv_idx):
        ok = q_idx + start - kv_idx >= window
        return ok & valid[b, kv_idx] if valid is not None else ok

    mask_b = bsz if valid is not None else None
    # Every layer of one forward pass shares these masks: build them once per shape.
    key_id = (
        q_len,
        n,
        query_start,
        neighbor_window,
        str(query.device),
        mask_b,
        None if valid is None else (valid.data_ptr(), valid._version),
    )
    masks = _MASKS.get(key_id)
    if masks is None:
        masks = tuple(
            create_block_mask(mod, mask_b, None, q_len, n, device=query.device, _compile=True) for mod in (near, far)
        )
        _MASKS.clear()
        _MASKS[key_id] = masks
    parts = []
    for block_mask, q, k in zip(masks, (query, grouped_query), (key, grouped_key), strict=True):
        out, lse = flex(q, k, value, block_mask=block_mask, scale=scale, enable_gqa=True, return_lse=True)
        parts.append((out.nan_to_num(0.0), lse.float()))
    return merge_partials(parts, query.dtype)
