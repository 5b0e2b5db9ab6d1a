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

    return torch.compile(flex_attention, dynamic=False), create_block_mask


_MASKS: dict[tuple, tuple] = {}
BUCKET = 512


def _bucket(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - x.shape[2]
    return x if extra == 0 else torch.nn.functional.pad(x, (0, 0, 0, extra))


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
    from .lse import merge_partials

    flex, create_block_mask = _kernels()
    bsz, _, q_len, _ = query.shape
    n = grouped_key.shape[2]
    # Pad both lengths up to a bucket so that prompts of nearby lengths share one compiled kernel.
    q_pad, n_pad = _bucket(q_len), _bucket(n)
    query, grouped_query = _pad(query, q_pad), _pad(grouped_query, q_pad)
    key, value, grouped_key = _pad(key[:, :, :n], n_pad), _pad(value[:, :, :n], n_pad), _pad(grouped_key, n_pad)
    device = query.device
    start = torch.tensor(query_start, device=device)
    window = torch.tensor(neighbor_window, device=device)
    limit = torch.tensor(n, device=device)
    valid = None
    if key_valid is not None:
        valid = torch.zeros((bsz, n_pad), dtype=torch.bool, device=device)
        valid[:, :n] = key_valid[:, :n]

    def near(b, h, q_idx, kv_idx):
        dist = q_idx + start - kv_idx
        ok = (dist >= 0) & (dist < window) & (kv_idx < limit)
        return ok & valid[b, kv_idx] if valid is not None else ok

    def far(b, h, q_idx, kv_idx):
        ok = (q_idx + start - kv_idx >= window) & (kv_idx < limit)
        return ok & valid[b, kv_idx] if valid is not None else ok

    mask_b = bsz if valid is not None else None
    # Every layer of one forward pass shares these masks: build them once per shape.
    key_id = (
        q_pad,
        n_pad,
        n,
        query_start,
        neighbor_window,
        str(device),
        mask_b,
        None if key_valid is None else (key_valid.data_ptr(), key_valid._version),
    )
    masks = _MASKS.get(key_id)
    if masks is None:
        masks = tuple(
            create_block_mask(mod, mask_b, None, q_pad, n_pad, device=device, _compile=True) for mod in (near, far)
        )
        _MASKS.clear()
        _MASKS[key_id] = masks
    parts = []
    for block_mask, q, k in zip(masks, (query, grouped_query), (key, grouped_key), strict=True):
        out, lse = flex(q, k, value, block_mask=block_mask, scale=scale, enable_gqa=True, return_lse=True)
        parts.append((out[:, :, :q_len].nan_to_num(0.0), lse[:, :, :q_len].float()))
    return merge_partials(parts, query.dtype)
