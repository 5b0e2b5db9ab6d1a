"""Pure rotary-embedding math: re-rotating post-RoPE states to new positions.

RoPE rotates each pair of channels by ``pos * inv_freq``.  Rotations compose, so a state that
was rotated to ``pos`` reaches ``new_pos`` by one more rotation of ``new_pos - pos``.  That lets
SelfExtend work on the queries and keys transformers has already rotated (and cached) instead
of patching every model's attention class.  The extra rotation is a pure rotation: any
``attention_scaling`` (YaRN, LongRoPE) that the model folded into cos/sin is already in the
states and is neither stripped nor applied twice.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .config import LogScale

Layout = Literal["half", "interleaved"]


def rotation_tables(
    delta: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, memo: dict | None = None, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``delta * inv_freq``, shaped ``(*delta.shape, len(inv_freq))``.

    The angle is formed in float64: positions reach 1e5 and more, where a float32 product
    would already be off by a few milliradians on the fastest channels.  ``memo`` (one dict per
    forward pass, see :mod:`.hf.attention`) shares the tables between layers, which rotate by the
    same positions: a decode step then builds them once instead of once per layer.
    """
    if memo is not None:
        key = (name, id(inv_freq), dtype, tuple(delta.shape))
        if key not in memo:
            memo[key] = rotation_tables(delta, inv_freq, dtype)
        return memo[key]
    angle = delta.to(torch.float64)[..., None] * inv_freq.to(device=delta.device, dtype=torch.float64)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rotate(
    x: torch.Tensor,
    delta: torch.Tensor,
    inv_freq: torch.Tensor,
    layout: Layout = "half",
    memo: dict | None = None,
    name: str = "",
) -> torch.Tensor:
    """Rotate ``x`` (``batch, heads, seq, head_dim``) by ``delta`` (``batch, seq``) positions.

    ``memo``/``name``: reuse the tables computed for the same ``name`` in this forward pass.

    Only the first ``2 * len(inv_freq)`` channels rotate (partial rotary models leave the rest
    untouched).  ``layout`` is how the model pairs channels: ``"half"`` pairs ``i`` with
    ``i + d/2`` (Llama, Mistral, Qwen, Gemma, Phi-3), ``"interleaved"`` pairs ``2i`` with ``2i+1``
    (GPT-J, Cohere, GLM).
    """
    rot = 2 * inv_freq.shape[-1]
    if rot > x.shape[-1]:
        raise ValueError(f"rotary dim {rot} exceeds head dim {x.shape[-1]}")
    compute = torch.promote_types(x.dtype, torch.float32)
    cos, sin = rotation_tables(delta, inv_freq, compute, memo, name)
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    xr = x[..., :rot].to(compute)
    if layout == "half":
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    elif layout == "interleaved":
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        raise ValueError(f"unknown RoPE layout {layout!r}; expected 'half' or 'interleaved'")
    out = out.to(x.dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rot:]), dim=-1)


def log_scale_factor(positions: torch.Tensor, scaling: LogScale, dtype: torch.dtype) -> torch.Tensor:
    """SelfExtend's optional query scaling ``max(1, 1 + s * (log(pos + 1) / log(base) - 1))`` at strength ``s``
    (``s = 1``: LongLM's ``log(pos + 1) / log(base)``), shaped to multiply ``(batch, heads, seq, dim)`` queries
    at ``positions`` (``batch, seq``)."""
    ratio = torch.log(positions.double() + 1) / math.log(scaling.base)
    factor = torch.clamp(1 + scaling.strength * (ratio - 1), min=1.0)
    return factor[:, None, :, None].to(dtype)


def log_scale(
    query: torch.Tensor, positions: torch.Tensor, scaling: LogScale | None, memo: dict | None = None
) -> torch.Tensor:
    """Queries scaled by :func:`log_scale_factor` (unchanged when ``scaling`` is None: scaling off).

    ``memo``: the factors are shared by the layers of one forward pass, like the rotation tables.
    """
    if scaling is None:
        return query
    if memo is None:
        return query * log_scale_factor(positions, scaling, query.dtype)
    key = ("log", scaling, query.dtype, tuple(positions.shape))
    if key not in memo:
        memo[key] = log_scale_factor(positions, scaling, query.dtype)
    return query * memo[key]


def grouped_query_position(pos: torch.Tensor, group_size: int, neighbor_window: int) -> torch.Tensor:
    """Grouped position of a query: ``pos // G + W - W // G``."""
    return torch.div(pos, group_size, rounding_mode="floor") + (neighbor_window - neighbor_window // group_size)


def grouped_key_position(pos: torch.Tensor, group_size: int) -> torch.Tensor:
    """Grouped position of a key: ``pos // G``."""
    return torch.div(pos, group_size, rounding_mode="floor")
