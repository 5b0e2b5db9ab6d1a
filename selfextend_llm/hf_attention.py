"""The transformers adapter: one attention function and one mask function, registered by name.

transformers 5.x rotates queries and keys inside each attention module, caches the keys, then
calls the function registered in ``AttentionInterface`` under ``config._attn_implementation``.
Registering ``"selfextend"`` there (and in ``AttentionMaskInterface``, without which no mask
is built) makes every RoPE model use SelfExtend without patching a single model class.

The mask function hands the attention function a compact :class:`PaddingMask` (which keys are
padding, where the queries start) instead of a ``q x n`` boolean tensor: SelfExtend derives
causality from distances itself, so the ``n x n`` mask is never built for full-attention
layers.  Layers that need another mask (sliding windows, image tokens) get the regular SDPA mask.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from .attention import DEFAULT_BLOCK_SIZE, GroupedKeyCache, selfextend_attention
from .config import SelfExtendConfig

if TYPE_CHECKING:
    from .rope import Layout

ATTN_NAME = "selfextend"


@dataclass
class PaddingMask:
    """What SelfExtend needs of a causal mask: which keys are real, and where the queries start."""

    key_valid: torch.Tensor | None
    query_start: int | None
    kv_length: int

    def dense(self, q_len: int, device: torch.device) -> torch.Tensor | None:
        """The equivalent boolean ``(b|1, 1, q, n)`` causal mask, for layers that stay plain."""
        start = self.kv_length - q_len if self.query_start is None else self.query_start
        if self.key_valid is None and start == self.kv_length - q_len:
            return None  # plain causal: SDPA's is_causal path
        rows = torch.arange(start, start + q_len, device=device)
        mask = (torch.arange(self.kv_length, device=device)[None, :] <= rows[:, None])[None, None]
        if self.key_valid is not None:
            mask = mask & self.key_valid[:, None, None, :].to(device)
        return mask


@dataclass
class RuntimeSettings:
    """Settings shared by every SelfExtend layer of one model; changing them takes effect at once."""

    config: SelfExtendConfig
    pretrained_context: int
    block_size: int = DEFAULT_BLOCK_SIZE
    backend: str = "auto"
    #: When True, layers run plain SDPA (used for prompts that fit the trained window with G=1).
    bypass: bool = False
    calls: int = 0


@dataclass
class LayerState:
    """Per-layer SelfExtend state: where its rotary frequencies live and its grouped-key cache."""

    settings: RuntimeSettings
    rotary: torch.nn.Module
    freq_attr: str
    layout: Layout
    key_cache: GroupedKeyCache | None = field(default=None, repr=False)

    @property
    def inv_freq(self) -> torch.Tensor:
        # Read live: dynamic rope variants (LongRoPE) swap frequencies in the rotary forward.
        return getattr(self.rotary, self.freq_attr)


def selfextend_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int | torch.Tensor | None = None,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs,
):
    """Mask interface entry: compact for plain causal masks, SDPA's boolean mask otherwise."""
    cache_position = kwargs.get("cache_position")
    if q_offset is None and cache_position is not None:
        q_offset = cache_position[0]
    if mask_function is causal_mask_function and kv_offset == 0 and local_size is None and kv_length is not None:
        valid = None
        if attention_mask is not None:
            valid = attention_mask.bool()
            if valid.shape[-1] < kv_length:
                valid = torch.nn.functional.pad(valid, (0, kv_length - valid.shape[-1]))
            valid = valid[:, :kv_length]
            if bool(valid.all()):
                valid = None
        start = int(q_offset) if q_offset is not None else None
        return PaddingMask(key_valid=valid, query_start=start, kv_length=kv_length)
    kwargs.pop("allow_is_causal_skip", None)
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset if q_offset is not None else 0,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=False,
        **kwargs,
    )


def _plain(module, query, key, value, attention_mask, **kwargs):
    """Plain attention for layers SelfExtend leaves alone: SDPA, or the model's own eager code
    where SDPA cannot follow (logit softcapping in Gemma 2)."""
    if isinstance(attention_mask, PaddingMask):
        attention_mask = attention_mask.dense(query.shape[2], query.device)
    if kwargs.get("softcap") is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__name__} uses logit softcapping but has no eager attention to fall back on")
    if attention_mask is None:
        q_len, n = query.shape[2], key.shape[2]
        attention_mask = PaddingMask(None, n - q_len, n).dense(q_len, query.device)
        if attention_mask is None:
            rows = torch.arange(n - q_len, n, device=query.device)
            attention_mask = (torch.arange(n, device=query.device)[None, :] <= rows[:, None])[None, None]
    if attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min
        )
    return eager(module, query, key, value, attention_mask, **kwargs)


def selfextend_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry.  Layers without SelfExtend state (sliding windows) stay plain."""
    state: LayerState | None = getattr(module, "_selfextend", None)
    if state is None or state.settings.bypass:
        return _plain(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    settings = state.settings
    settings.calls += 1
    q_len, n_keys = query.shape[2], key.shape[2]
    query_start = n_keys - q_len
    key_valid = full_mask = None
    if isinstance(attention_mask, PaddingMask):
        key_valid = attention_mask.key_valid
        if attention_mask.query_start is not None:
            query_start = attention_mask.query_start
    elif isinstance(attention_mask, torch.Tensor):
        full_mask = (
            attention_mask
            if attention_mask.dtype == torch.bool
            else attention_mask > torch.finfo(attention_mask.dtype).min / 2
        )
        full_mask = full_mask[..., :n_keys]
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(query_start, query_start + q_len, device=query.device)[None]
    elif positions.dim() != 2:
        raise ValueError(
            f"SelfExtend needs 1-D token positions per sequence; got position_ids of shape {tuple(positions.shape)} "
            "(multimodal RoPE is not supported)"
        )
    cfg = settings.config
    out, state.key_cache = selfextend_attention(
        query,
        key,
        value,
        query_positions=positions.to(query.device),
        query_start=query_start,
        group_size=cfg.group_size,
        neighbor_window=cfg.neighbor_window,
        inv_freq=state.inv_freq,
        layout=state.layout,
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        key_valid=None if key_valid is None else key_valid.to(query.device),
        full_mask=full_mask,
        softcap=kwargs.get("softcap"),
        log_scale_base=settings.pretrained_context if cfg.log_scale else None,
        block_size=settings.block_size,
        key_cache=state.key_cache,
        backend=settings.backend,
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="selfextend"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, selfextend_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, selfextend_mask)
