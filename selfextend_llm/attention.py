"""SelfExtend attention: one entry point that picks a path and hands the work to a kernel.

Queries and keys arrive already rotated to their true positions (transformers applies RoPE
before caching).  For a query at cache index ``i`` and a key at ``j``, ``i - j < W`` uses the
plain score and ``i - j >= W`` the grouped score ``q(p_i // G + W - W // G) . k(p_j // G)``; both
share one softmax.  Every path computes exactly that (each is tested against the float64 formula
in :mod:`.reference`); they differ in speed and in what they accept:

========================  ========================================================================
path                      when
========================  ========================================================================
``"triton_decode"``       CUDA, one query per row: split-K, grouped keys rotated in registers
``"triton_split"``        CUDA, a whole unpadded half-precision prefill: grouped part on cuDNN
``"triton_prefill"``      CUDA, chunks, padding, float32: the one-pass kernel
``"inside_window"``       every key inside every query's window: exactly plain causal SDPA
``"explicit_decode"``     the CPU, one query per row: explicit scores, one softmax
``"flex"``                CUDA without Triton's shapes, long chunks: two flex_attention passes
``"blocks"``              anything else (softcapping, custom masks, interleaved RoPE): the block
                          algorithm on a fused kernel with the row log-sum-exp
========================  ========================================================================

The kernels live in :mod:`.kernels`; this module only chooses (:func:`choose_path`).
"""

from __future__ import annotations

import warnings
from typing import Literal, get_args

import torch

from .config import LogScale
from .kernels import flex
from .kernels import triton as triton_kernels
from .kernels.blocks import (
    DEFAULT_BLOCK_SIZE,
    GroupedKeyCache,
    block_attention,
    decode_explicit,
    grouped_keys,
    key_positions,
    row_offsets,
)
from .kernels.lse import Kernel, NoFusedCausalKernel
from .rope import Layout, grouped_query_position, log_scale, rotate

#: What ``apply(..., backend=...)`` accepts: ``"auto"`` (the fastest exact path for the device), a
#: GPU path to force (``"split"``, ``"triton"``, ``"flex"``), or the block path on one per-block
#: :data:`.kernels.lse.Kernel`.
Backend = Literal["auto", "split", "triton", "flex", "math", "cpu_flash", "cuda_efficient"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
Path = Literal["triton_decode", "triton_split", "triton_prefill", "inside_window", "explicit_decode", "flex", "blocks"]
#: Prefill chunks at least this long use the flex_attention path on CUDA.
FLEX_MIN_QUERIES = 128

__all__ = [
    "BACKENDS",
    "DEFAULT_BLOCK_SIZE",
    "Backend",
    "GroupedKeyCache",
    "Path",
    "check_backend",
    "choose_path",
    "selfextend_attention",
]


def check_backend(backend: object) -> None:
    """Refuse an unknown backend name, listing the known ones."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _triton_fits(
    backend: Backend,
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
        and triton_kernels.available(query.device)
        and triton_kernels.supports(query.shape[-1], 2 * inv_freq.shape[-1], layout, query.dtype)
    )
    if backend in ("triton", "split") and not fits:
        raise ValueError(
            f"backend {backend!r} needs a CUDA device (or TRITON_INTERPRET=1), the 'half' RoPE layout with full "
            "rotary, a power-of-two head dim, no softcapping and no custom mask; use backend='auto'"
        )
    return fits and (backend != "auto" or query.device.type == "cuda")


def choose_path(
    backend: Backend,
    query: torch.Tensor,
    *,
    query_start: int,
    neighbor_window: int,
    inv_freq: torch.Tensor,
    layout: Layout,
    key_valid: torch.Tensor | None,
    full_mask: torch.Tensor | None,
    softcap: float | None,
    triton_ok: bool = True,
) -> Path:
    """The path for this call (see the module doc); ``triton_ok=False`` after a Triton launch failed."""
    q_len = query.shape[2]
    if triton_ok and _triton_fits(backend, query, inv_freq, layout, full_mask, softcap):
        if q_len == 1:
            return "triton_decode"
        whole = query_start == 0 and key_valid is None
        if whole and (backend == "split" or (backend == "auto" and query.dtype != torch.float32)):
            return "triton_split"
        return "triton_prefill"
    unmasked = key_valid is None and full_mask is None and softcap is None and backend == "auto"
    if unmasked and query_start == 0 and 1 < q_len <= neighbor_window:
        return "inside_window"
    if q_len == 1 and backend == "auto" and full_mask is None and softcap is None and query.device.type == "cpu":
        return "explicit_decode"
    if (
        backend in ("auto", "flex")
        and q_len >= FLEX_MIN_QUERIES
        and full_mask is None
        and softcap is None
        and flex.available(query.device)
    ):
        return "flex"
    return "blocks"


def _run_triton(path: Path, query, key, value, offsets, query_start, G, W, inv_freq, scale, key_valid) -> torch.Tensor:
    """The GPU kernels, on the keys up to the last query (later ones are never visible)."""
    n_keys = query_start + query.shape[2]
    key, value = key[:, :, :n_keys], value[:, :, :n_keys]
    key_valid = None if key_valid is None else key_valid[:, :n_keys]
    args = dict(offsets=offsets, group_size=G, neighbor_window=W, inv_freq=inv_freq, scale=scale)
    if path == "triton_decode":
        return triton_kernels.decode(query, key, value, key_valid=key_valid, **args)
    if path == "triton_split":
        try:
            return triton_kernels.prefill_split(query, key, value, **args)
        except NoFusedCausalKernel:
            pass  # e.g. a GPU without cuDNN/FlashAttention-2 kernels for this shape: the one-pass kernel
    grouped = triton_kernels.rotate_keys_to_groups(key, offsets, G, inv_freq)
    return triton_kernels.prefill(query, key, value, grouped, query_start=query_start, key_valid=key_valid, **args)


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
    log_scaling: LogScale | None = None,
    block_size: int | None = None,
    key_cache: GroupedKeyCache | None = None,
    backend: Backend = "auto",
    grouped_buffer: torch.Tensor | None = None,
    memo: dict | None = None,
) -> tuple[torch.Tensor, GroupedKeyCache | None]:
    """SelfExtend attention of ``query`` (``b, h, q, d``) over cached ``key``/``value`` (``b, kv_h, n, d``).

    ``query_positions`` (``b, q``) are the RoPE positions the queries were rotated to;
    ``query_start`` is the cache index of the first query.  ``key_valid`` (``b, n``) marks real
    (non-padding) keys; ``full_mask`` (``b|1, 1, q, n``) is an arbitrary extra boolean mask.
    Returns the output (``b, h, q, d``) and the grouped-key cache to keep for the next step (None
    on the Triton paths, which need none).  ``log_scaling``: log-scaled queries
    (:meth:`.SelfExtendConfig.log_scaling`), None for none.  ``grouped_buffer`` (``b, kv_h, >= n, d``) receives
    the grouped keys when they are rotated afresh: a static cache's mirror, kept slot for slot for
    the decode steps.  ``memo``: one dict per forward pass, shared by its layers, for what depends
    on positions only (rotation tables, log-scaling factors).
    """
    q_len, n_keys = query.shape[2], key.shape[2]
    G, W = group_size, neighbor_window
    if query_positions.shape[0] != query.shape[0]:
        query_positions = query_positions.expand(query.shape[0], -1)
    query = log_scale(query, query_positions, log_scaling, memo)
    where = dict(query_start=query_start, neighbor_window=W, inv_freq=inv_freq, layout=layout)
    masks = dict(key_valid=key_valid, full_mask=full_mask, softcap=softcap)
    path = choose_path(backend, query, **where, **masks)
    if path.startswith("triton"):
        offsets = row_offsets(query_positions, query_start)
        try:
            return _run_triton(path, query, key, value, offsets, query_start, G, W, inv_freq, scale, key_valid), None
        except triton_kernels.OutOfResources as err:
            if backend != "auto":
                raise
            warnings.warn(
                f"SelfExtend's Triton kernels do not fit this GPU for this shape ({err}); using flex_attention",
                stacklevel=2,
            )
            triton_kernels.disable(query.shape[-1], query.dtype)
            path = choose_path(backend, query, **where, **masks, triton_ok=False)

    # Grouped keys for every key the next step's queries may see grouped, reusing the last step's.
    k_pos, offsets = key_positions(query_positions, query_start, n_keys)
    cache_upto = min(n_keys, query_start + q_len)
    kg, new_cache = (
        grouped_keys(key, k_pos, offsets, cache_upto, G, inv_freq, layout, key_cache, query_start, grouped_buffer, memo)
        if cache_upto > 0
        else (key[:, :, :0], None)
    )
    if path == "inside_window":
        # Exactly plain causal attention, in one fused call (short prompts on models whose tuned
        # window covers them pay nothing for SelfExtend).
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key[:, :, :q_len], value[:, :, :q_len], is_causal=True, scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )  # fmt: skip
        return out, new_cache
    gq_shift = grouped_query_position(query_positions, G, W) - query_positions
    grouped_query = rotate(query, gq_shift, inv_freq, layout, memo if q_len == 1 else None, f"q{G}:{W}")
    if path == "explicit_decode":
        boundary = max(0, min(n_keys, query_start + 1 - W))
        return decode_explicit(query, grouped_query, key, kg, value, boundary, key_valid, scale), new_cache
    if path == "flex":
        out = flex.flex_selfextend(
            query, key, value, grouped_query, kg, query_start=query_start, neighbor_window=W, key_valid=key_valid,
            scale=scale,
        )  # fmt: skip
        return out, new_cache
    kernel: Kernel = backend if backend in get_args(Kernel) else "auto"  # type: ignore[assignment]
    out = block_attention(
        query, key, value, grouped_query, kg, query_start=query_start, neighbor_window=W, scale=scale,
        key_valid=key_valid, full_mask=full_mask, softcap=softcap, block_size=block_size, kernel=kernel,
    )  # fmt: skip
    return out, new_cache
