"""The transformers adapter: one attention function and one mask function, registered by name.

transformers 5.x rotates queries and keys inside each attention module, caches the keys, then
calls the function registered in ``AttentionInterface`` under ``config._attn_implementation``.
Registering ``"selfextend"`` there (and in ``AttentionMaskInterface``, without which no mask
is built) makes every RoPE model use SelfExtend without patching a single model class.

The mask function hands the attention function a *key row* instead of a ``q x n`` boolean mask:
a ``(b, 1, 1, n)`` boolean tensor, True for every cache slot that holds a real key of the
sequence so far (``None`` when that is every slot and nothing is padding).  SelfExtend derives
causality from distances itself, so the ``n x n`` mask is never built for full-attention layers.
A key row is a plain 4-D tensor, so transformers passes it through untouched (static caches
build masks before the forward), and it is data rather than Python state, so a decode step over a
static cache compiles (:mod:`..kernels.static_decode`).  For one query it is exactly the mask SDPA would
get.  Layers that need another mask (sliding windows, image tokens) get the regular SDPA mask.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from ..attention import Backend, GroupedKeyCache, selfextend_attention
from ..config import SelfExtendConfig
from ..kernels import static_decode
from ..kernels.blocks import row_offsets
from ..kernels.static_decode import StaticGroupedKeys, is_key_row, last_visible, sequence_end

if TYPE_CHECKING:
    from ..rope import Layout

ATTN_NAME = "selfextend"
#: Grouped-key caches kept per layer (each about one K cache of memory while kept).
KEPT_GROUPED_CACHES = 4


@dataclass
class RuntimeSettings:
    """Settings shared by every SelfExtend layer of one model; changing them takes effect at once."""

    config: SelfExtendConfig
    pretrained_context: int
    #: Query rows per block of the CPU block path; None: its own default per path.
    block_size: int | None = None
    backend: Backend = "auto"
    #: When True, layers run plain SDPA (used for prompts that fit the trained window with G=1).
    bypass: bool = False
    calls: int = 0
    #: The last key row read eagerly and what it said (``end``, ``key_valid``): read once per
    #: forward, not once per layer, since reading it is a host sync.
    _row: torch.Tensor | None = field(default=None, repr=False)
    _row_view: tuple[int, torch.Tensor | None] = field(default=(0, None), repr=False)

    _memo_for: torch.Tensor | None = field(default=None, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)

    def memo(self, positions: torch.Tensor) -> dict:
        """One dict per forward pass (recognised by its ``position_ids`` tensor, which every layer
        receives): position-only values computed by the first layer, reused by the others."""
        if self._memo_for is not positions:
            self._memo_for, self._memo = positions, {}
        return self._memo

    def read_key_row(self, key_row: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """``(end, key_valid)`` of a key row: slots ``[0, end)`` hold the sequence so far;
        ``key_valid`` (``b, end``) marks real keys, None when none of them is padding."""
        if self._row is not key_row:
            visible = key_row[:, 0, 0, :]
            end = sequence_end(key_row)
            valid = visible[:, :end]
            self._row, self._row_view = key_row, (end, None if bool(valid.all()) else valid)
        return self._row_view


@dataclass
class LayerState:
    """Per-layer SelfExtend state: where its rotary frequencies live and its grouped-key cache."""

    settings: RuntimeSettings
    rotary: torch.nn.Module
    freq_attr: str
    layout: Layout
    #: Grouped-key caches of the sequences this layer decodes, newest first: a few, so that batches
    #: that take turns (continuous batching, a prefill between decode steps) each keep theirs.
    key_caches: list[GroupedKeyCache] = field(default_factory=list, repr=False)
    #: Grouped keys mirroring a static cache (slot for slot), for tensor-only decode steps.
    static_keys: StaticGroupedKeys | None = field(default=None, repr=False)

    def grouped_cache_for(self, key: torch.Tensor, query_start: int, offsets: torch.Tensor, group_size: int):
        """The kept grouped-key cache that this call continues, if any."""
        return next((c for c in self.key_caches if c.continues(key, query_start, offsets, group_size)), None)

    def keep(self, cache: GroupedKeyCache | None, replaces: GroupedKeyCache | None) -> None:
        """Keep ``cache`` first (in place of the one it extends); at most :data:`KEPT_GROUPED_CACHES`."""
        rest = [c for c in self.key_caches if c is not replaces]
        self.key_caches = ([cache] if cache is not None else []) + rest[: KEPT_GROUPED_CACHES - 1]

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
    """Mask interface entry: a key row (or None) for plain causal masks, SDPA's mask otherwise.

    Tensor-only: ``q_offset`` stays a tensor where the cache gives one (static caches), so the
    mask of a compiled decode step is built inside the graph without a host sync.
    """
    cache_position = kwargs.get("cache_position")  # transformers before 5.20 passes this instead
    if q_offset is None and cache_position is not None:
        q_offset = cache_position[0]
    if q_length is None and cache_position is not None:
        q_length = cache_position.shape[0]
    if (
        mask_function is causal_mask_function
        and kv_offset == 0
        and local_size is None
        and kv_length is not None
        and q_length is not None
    ):
        start = 0 if q_offset is None else q_offset
        if attention_mask is None and isinstance(start, int) and start + q_length == kv_length:
            return None  # plain causal over exactly the keys there
        device = kwargs.get("device")
        if device is None:
            device = attention_mask.device if attention_mask is not None else cache_position.device
        row = torch.arange(kv_length, device=device) < start + q_length
        if attention_mask is not None:
            valid = attention_mask.to(device=device, dtype=torch.bool)
            if valid.shape[-1] < kv_length:
                valid = torch.nn.functional.pad(valid, (0, kv_length - valid.shape[-1]))
            row = row & valid[:, :kv_length]
        return row.expand(batch_size, kv_length)[:, None, None, :]
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


def dense_causal(key_row: torch.Tensor | None, q_len: int, n_keys: int, device: torch.device) -> torch.Tensor | None:
    """The boolean ``(b|1, 1, q, n)`` causal mask a key row stands for (None: SDPA's ``is_causal``).

    Eager only for more than one query (reading where the queries stand is a host sync); for one
    query the key row already is that mask.
    """
    if key_row is not None and q_len == 1:
        return key_row
    end = n_keys
    if key_row is not None:
        end = sequence_end(key_row)
        if end == n_keys and bool(key_row.all()):
            key_row = None
    if key_row is None and end == n_keys == q_len:  # SDPA's is_causal aligns top-left: only when square
        return None
    rows = torch.arange(end - q_len, end, device=device)
    mask = (torch.arange(n_keys, device=device)[None, :] <= rows[:, None])[None, None]
    return mask if key_row is None else mask & key_row.to(device)


def plain_attention(module, query, key, value, attention_mask, **kwargs):
    """Plain attention for layers SelfExtend leaves alone: SDPA, or the model's own eager code
    where SDPA cannot follow (logit softcapping in Gemma 2)."""
    q_len, n = query.shape[2], key.shape[2]
    if attention_mask is None or is_key_row(attention_mask, q_len):
        attention_mask = dense_causal(attention_mask, q_len, n, query.device)
    if kwargs.get("softcap") is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__name__} uses logit softcapping but has no eager attention to fall back on")
    if attention_mask is None:
        rows = torch.arange(n - q_len, n, device=query.device)
        attention_mask = (torch.arange(n, device=query.device)[None, :] <= rows[:, None])[None, None]
    if attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min
        )
    return eager(module, query, key, value, attention_mask, **kwargs)


def _positions(kwargs: dict, query_start: int | None, q_len: int, device: torch.device) -> torch.Tensor | None:
    positions = kwargs.get("position_ids")
    if positions is None:
        if query_start is None:
            return None
        return torch.arange(query_start, query_start + q_len, device=device)[None]
    if positions.dim() != 2:
        raise ValueError(
            f"SelfExtend needs 1-D token positions per sequence; got position_ids of shape {tuple(positions.shape)} "
            "(multimodal RoPE is not supported)"
        )
    return positions.to(device)


def _static_step(state: LayerState, query, key, value, key_row, positions, scale, softcap) -> torch.Tensor:
    """One decode step over a static cache: tensor-only, the same code eager and compiled."""
    cfg, settings = state.settings.config, state.settings
    return static_decode.decode_step(
        query,
        key,
        value,
        key_row,
        positions.expand(query.shape[0], -1),
        None if state.static_keys is None else state.static_keys.keys,
        group_size=cfg.group_size,
        neighbor_window=cfg.neighbor_window,
        inv_freq=state.inv_freq,
        layout=state.layout,
        scale=scale,
        log_scaling=cfg.log_scaling(settings.pretrained_context),
        softcap=softcap,
        backend=settings.backend,
    )


def _mirror_needed(state: LayerState, query: torch.Tensor, softcap: float | None) -> bool:
    """Whether static decode steps will read a grouped-key mirror (not on the Triton kernel)."""
    return not static_decode.triton_decodes(query, state.inv_freq, state.layout, softcap, state.settings.backend)


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
    """``AttentionInterface`` entry.  Layers without SelfExtend state (sliding windows) stay plain.

    Three cases: a decode step inside ``torch.compile`` (static cache, tensor-only); a static
    cache run eagerly (keys sliced to the slots in use; prefill also fills the grouped-key
    mirror that decode steps read); a dynamic cache (the keys are exactly the sequence so far).
    """
    state: LayerState | None = getattr(module, "_selfextend", None)
    if state is None or state.settings.bypass:
        return plain_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    settings, cfg = state.settings, state.settings.config
    q_len, n_keys = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    key_row = attention_mask if is_key_row(attention_mask, q_len) else None

    softcap = kwargs.get("softcap")
    if torch.compiler.is_compiling():
        if key_row is None or q_len != 1 or (state.static_keys is None and _mirror_needed(state, query, softcap)):
            raise RuntimeError(
                "SelfExtend compiles decode steps over a static cache (generate(..., cache_implementation='static')); "
                "run the prefill, and any call with more than one new token, uncompiled"
            )
        positions = _positions(kwargs, None, q_len, query.device)
        if positions is None:  # no padding offsets without position ids: the slot is the position
            positions = last_visible(key_row)[:, None]
        return _static_step(state, query, key, value, key_row, positions, scale, softcap).transpose(1, 2), None

    settings.calls += 1
    query_start, key_valid, full_mask = n_keys - q_len, None, None
    end = n_keys
    if key_row is not None:
        end, key_valid = settings.read_key_row(key_row)
        query_start = end - q_len
    elif isinstance(attention_mask, torch.Tensor):
        full_mask = (
            attention_mask
            if attention_mask.dtype == torch.bool
            else attention_mask > torch.finfo(attention_mask.dtype).min / 2
        )
        full_mask = full_mask[..., :n_keys]
    positions = _positions(kwargs, query_start, q_len, query.device)

    # Slots past the sequence: a static cache.  (A full static cache looks dynamic and takes the
    # dynamic path, exactly, for its last step.)
    static = end < n_keys
    continued = None
    if not static:
        state.static_keys = None
    else:
        needs_mirror = _mirror_needed(state, query, softcap)
        if q_len == 1 and not needs_mirror:  # the GPU kernel reads the static cache as it is
            step = _static_step(state, query, key, value, key_row, positions, scale, softcap)
            return step.transpose(1, 2), None
        state.key_caches = []  # the mirror replaces the dynamic grouped-key caches here
        if needs_mirror:
            # Eagerly (the CPU), the keys in use are a slice: the dynamic path runs on it, with the
            # mirror as its grouped-key storage, so a step rotates only its own key and, unlike the
            # dynamic cache, copies nothing.
            mirror = state.static_keys
            fresh = not (
                mirror is not None
                and mirror.owner == key.data_ptr()
                and mirror.group_size == cfg.group_size
                and mirror.keys.shape == key.shape
            )
            if fresh:
                mirror = static_decode.new_mirror(key, cfg.group_size)
            elif query_start > 0:
                continued = GroupedKeyCache(
                    keys=mirror.keys[:, :, :query_start],
                    last_raw_key=key[:, :, query_start - 1],
                    offsets=row_offsets(positions.expand(query.shape[0], -1), query_start),
                    group_size=cfg.group_size,
                    buffer=mirror.keys,
                )
            state.static_keys = mirror
        key, value = key[:, :, :end], value[:, :, :end]

    previous = None
    if not static and query_start > 0 and state.key_caches:
        offsets = row_offsets(positions.expand(query.shape[0], -1), query_start)
        previous = state.grouped_cache_for(key, query_start, offsets, cfg.group_size)
    out, new_cache = selfextend_attention(
        query,
        key,
        value,
        query_positions=positions,
        query_start=query_start,
        group_size=cfg.group_size,
        neighbor_window=cfg.neighbor_window,
        inv_freq=state.inv_freq,
        layout=state.layout,
        scale=scale,
        key_valid=None if key_valid is None else key_valid.to(query.device),
        full_mask=full_mask,
        softcap=softcap,
        log_scaling=cfg.log_scaling(settings.pretrained_context),
        block_size=settings.block_size,
        key_cache=continued if static else previous,
        backend=settings.backend,
        grouped_buffer=None if state.static_keys is None else state.static_keys.keys,
        memo=settings.memo(positions) if kwargs.get("position_ids") is not None else None,
    )
    if not static:
        state.keep(new_cache, previous)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="selfextend"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, selfextend_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, selfextend_mask)
