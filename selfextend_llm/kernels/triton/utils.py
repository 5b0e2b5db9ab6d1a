"""What the Triton kernels share: the key loop, the key ranges, trigonometry and launch settings.

Every SelfExtend kernel walks its keys in the same four ranges, the way Triton's fused-attention
tutorial walks its stages in ``_attn_fwd_inner``:

* **far**: keys every query of the tile sees grouped: only the grouped product;
* **edge**: keys at the window edge: both products, picked per entry by distance;
* **mid**: keys inside every query's window: only the plain product, no mask;
* **diagonal**: the causal diagonal (or the partial last block).

:func:`attn_fwd_inner` owns that loop; each kernel says which score kind each range uses with
the mode constexprs below (``SKIP`` leaves a range out at compile time), and the two prefill
kernels get their ranges from one function, :func:`band_ranges`.  So each query meets each key
once (twice only on the few blocks straddling the window edge), as in one causal flash attention,
and both score kinds share one online softmax.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import triton
import triton.language as tl

from . import interpreted

#: log2(e): scores are scaled by it once, so the online softmax runs on ``exp2`` (``LOG2E.value`` on the host).
LOG2E = tl.constexpr(1.4426950408889634)
#: Scores of hidden keys: finite, so fully masked rows do not turn into NaN mid-loop.
HIDDEN = tl.constexpr(-1.0e30)

# How a key range is scored (constexprs: each kernel's ranges compile to straight-line code).
#: Leave the range out.
SKIP = tl.constexpr(-1)
#: The grouped product only; no mask but padding.
GROUPED = tl.constexpr(0)
#: The plain product only; no mask but padding (whole blocks inside every query's window).
PLAIN = tl.constexpr(1)
#: Both products, picked by distance (``< W``: plain), under the causal mask.
BOTH = tl.constexpr(2)
#: The plain product under the causal mask.
CAUSAL = tl.constexpr(3)
#: The plain product for ``0 <= distance < W`` only (the grouped part is computed elsewhere).
NEAR = tl.constexpr(4)


@triton.jit
def floordiv(a, b):
    """Floor division for possibly negative ints (Triton's ``//`` truncates toward zero)."""
    q = a // b
    return tl.where((a % b != 0) & ((a < 0) != (b < 0)), q - 1, q)


@triton.jit
def rotate_rows(x1, x2, delta, inv):
    """Rotate half-layout rows ``(x1, x2)`` [M, HALF] by ``delta`` [M] positions."""
    ang = delta.to(tl.float32)[:, None] * inv[None, :]
    c = tl.cos(ang)
    s = tl.sin(ang)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def cos_sin(ang, FAST: tl.constexpr):
    """cos and sin; FAST: reduce to [-pi, pi] (two-constant Cody-Waite) and use the hardware
    approximations, a few instructions instead of libdevice's dozens.  The float32 angle
    itself is only good to ~1e-3 rad at 1e4+ positions, far coarser than either."""
    if FAST:
        k = tl.floor(ang * 0.15915494309189535 + 0.5)
        r = ang - k * 6.28125  # k * 6.28125 is exact in float32 for |k| < 2**15
        r = r - k * 0.001935307179586232
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1)
    else:
        c = tl.cos(ang)
        s = tl.sin(ang)
    return c, s


@triton.jit
def rotate_cols(x1, x2, delta, inv, FAST: tl.constexpr):
    """Rotate transposed half-layout keys ``(x1, x2)`` [HALF, N] by ``delta`` [N] positions."""
    ang = inv[:, None] * delta.to(tl.float32)[None, :]
    c, s = cos_sin(ang, FAST)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def load_queries(q_ptr, row_ok, pos, INV, G, W, HALF: tl.constexpr):
    """Load a query tile (two halves) and rotate it to its grouped positions ``p // G + W - W // G``."""
    q1 = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
    q2 = tl.load(q_ptr + HALF, mask=row_ok[:, None], other=0.0)
    inv = tl.load(INV + tl.arange(0, HALF))
    shift = floordiv(pos, G) + (W - W // G) - pos
    qg1, qg2 = rotate_rows(q1.to(tl.float32), q2.to(tl.float32), shift, inv)
    return q1, q2, qg1.to(q1.dtype), qg2.to(q1.dtype), inv


@triton.jit
def band_ranges(first, last, W, BLOCK_N: tl.constexpr):
    """Key ranges of a query tile whose rows sit at key indices ``first..last`` (see the module doc).

    Returns ``(edge_start, mid_start, diag_start, end)``: far keys are ``[0, edge_start)``, the
    window edge ``[edge_start, mid_start)``, keys inside every row's window and causally visible
    ``[mid_start, diag_start)``, the diagonal ``[diag_start, end)``.  Range bounds are block-aligned.
    """
    end = last + 1
    edge_start = (tl.maximum(first - W + 1, 0) // BLOCK_N) * BLOCK_N
    mid_start = tl.maximum(edge_start, ((tl.maximum(last - W + 1, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    diag_start = tl.maximum(mid_start, ((first + 1) // BLOCK_N) * BLOCK_N)
    return edge_start, tl.minimum(mid_start, end), tl.minimum(diag_start, end), end


@triton.jit
def _key_block(
    acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, K_ptr, KG_ptr, V_ptr, VALID_ptr, inv, off_b, n0, n_end,
    stride_kn, stride_kgn, stride_vn, G, W, qk_scale, BT_ptr, PAGE, stride_kblk, stride_vblk,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, HAS_VALID: tl.constexpr,
    PREC: tl.constexpr, ROTATE: tl.constexpr, FAST: tl.constexpr, PAGED: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax, scored as ``MODE`` says.

    ROTATE: grouped keys are made from the cached keys in registers (decoding: each key is met
    once per step) instead of read from ``KG_ptr`` (prefill: each key block is met by every query tile).
    PAGED: key ``j`` lives in cache block ``BT_ptr[j // PAGE]`` at row ``j % PAGE`` (a serving engine's
    paged KV cache, read in place through the sequence's block-table row) instead of at row ``j``.
    """
    j = n0 + tl.arange(0, BLOCK_N)
    in_range = j < n_end
    d = tl.arange(0, HALF)
    if PAGED:
        blk = tl.load(BT_ptr + j // PAGE, mask=in_range, other=0).to(tl.int64)
        k_rows = blk * stride_kblk + (j % PAGE) * stride_kn
        v_rows = blk * stride_vblk + (j % PAGE) * stride_vn
    else:
        k_rows = j * stride_kn
        v_rows = j * stride_vn
    if ROTATE or MODE != GROUPED:
        kp = K_ptr + k_rows[None, :] + d[:, None]
        k1 = tl.load(kp, mask=in_range[None, :], other=0.0)
        k2 = tl.load(kp + HALF, mask=in_range[None, :], other=0.0)
    if MODE == GROUPED or MODE == BOTH:
        if ROTATE:
            pos = j - off_b
            kg1, kg2 = rotate_cols(k1.to(tl.float32), k2.to(tl.float32), floordiv(pos, G) - pos, inv, FAST)
            kg1 = kg1.to(qg1.dtype)
            kg2 = kg2.to(qg2.dtype)
        else:
            kgp = KG_ptr + j[None, :] * stride_kgn + d[:, None]
            kg1 = tl.load(kgp, mask=in_range[None, :], other=0.0)
            kg2 = tl.load(kgp + HALF, mask=in_range[None, :], other=0.0)
        s_g = tl.dot(qg1, kg1, input_precision=PREC)
        s_g = tl.dot(qg2, kg2, s_g, input_precision=PREC)
    if MODE != GROUPED:
        s_n = tl.dot(q1, k1, input_precision=PREC)
        s_n = tl.dot(q2, k2, s_n, input_precision=PREC)
    if MODE == GROUPED:
        s = s_g
    elif MODE != BOTH:
        s = s_n
    else:
        dist = i_idx[:, None] - j[None, :]
        s = tl.where(dist < W, s_n, s_g)
    s = s * qk_scale
    if MODE >= BOTH:
        dist = i_idx[:, None] - j[None, :]
        seen = (dist >= 0) & in_range[None, :]
        if MODE == NEAR:
            seen = seen & (dist < W)
        s = tl.where(seen, s, HIDDEN)
    if HAS_VALID:
        ok = tl.load(VALID_ptr + j, mask=in_range, other=0)
        s = tl.where(ok[None, :] != 0, s, HIDDEN)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V_ptr + v_rows[:, None] + tl.arange(0, 2 * HALF)[None, :], mask=in_range[:, None], other=0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def attn_fwd_inner(
    acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, K_ptr, KG_ptr, V_ptr, VALID_ptr, inv, off_b,
    start, edge_start, mid_start, diag_start, end, stride_kn, stride_kgn, stride_vn, G, W, qk_scale,
    BT_ptr, PAGE, stride_kblk, stride_vblk,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    FAR: tl.constexpr, EDGE: tl.constexpr, MID: tl.constexpr, DIAG: tl.constexpr,
    HAS_VALID: tl.constexpr, PREC: tl.constexpr, ROTATE: tl.constexpr, FAST: tl.constexpr, PAGED: tl.constexpr,
):  # fmt: skip
    """The key loop of every kernel: keys ``[start, end)`` in four ranges, each scored by its mode.

    ``[start, edge_start)`` as ``FAR``, ``[edge_start, mid_start)`` as ``EDGE``, ``[mid_start,
    diag_start)`` as ``MID``, ``[diag_start, end)`` as ``DIAG``; a range whose mode is ``SKIP`` is
    not compiled.  ``q1, q2`` are the query tile's halves at true positions, ``qg1, qg2`` at
    grouped ones; ``i_idx`` the rows' key indices (for distances and the causal mask).  ``PAGED``: keys and
    values are read through a block-table row (``BT_ptr``, blocks of ``PAGE`` rows; see ``_key_block``).
    """
    if FAR != SKIP:
        for n0 in range(start, edge_start, BLOCK_N):
            acc, m_i, l_i = _key_block(
                acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, K_ptr, KG_ptr, V_ptr, VALID_ptr, inv, off_b, n0, end,
                stride_kn, stride_kgn, stride_vn, G, W, qk_scale, BT_ptr, PAGE, stride_kblk, stride_vblk,
                HALF, BLOCK_N, FAR, HAS_VALID, PREC, ROTATE, FAST, PAGED,
            )  # fmt: skip
    if EDGE != SKIP:
        for n0 in range(edge_start, mid_start, BLOCK_N):
            acc, m_i, l_i = _key_block(
                acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, K_ptr, KG_ptr, V_ptr, VALID_ptr, inv, off_b, n0, end,
                stride_kn, stride_kgn, stride_vn, G, W, qk_scale, BT_ptr, PAGE, stride_kblk, stride_vblk,
                HALF, BLOCK_N, EDGE, HAS_VALID, PREC, ROTATE, FAST, PAGED,
            )  # fmt: skip
    if MID != SKIP:
        for n0 in range(mid_start, diag_start, BLOCK_N):
            acc, m_i, l_i = _key_block(
                acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, K_ptr, KG_ptr, V_ptr, VALID_ptr, inv, off_b, n0, end,
                stride_kn, stride_kgn, stride_vn, G, W, qk_scale, BT_ptr, PAGE, stride_kblk, stride_vblk,
                HALF, BLOCK_N, MID, HAS_VALID, PREC, ROTATE, FAST, PAGED,
            )  # fmt: skip
    if DIAG != SKIP:
        for n0 in range(diag_start, end, BLOCK_N):
            acc, m_i, l_i = _key_block(
                acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, K_ptr, KG_ptr, V_ptr, VALID_ptr, inv, off_b, n0, end,
                stride_kn, stride_kgn, stride_vn, G, W, qk_scale, BT_ptr, PAGE, stride_kblk, stride_vblk,
                HALF, BLOCK_N, DIAG, HAS_VALID, PREC, ROTATE, FAST, PAGED,
            )  # fmt: skip
    return acc, m_i, l_i


# ------------------------------------------------------------------------------------------ host side
def cdiv(a: int, b: int) -> int:
    """Host-side ceil division (``triton.cdiv`` is a jitted function: ~10 us per host call)."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


F = TypeVar("F", bound=Callable[..., torch.Tensor])


def on_query_device(fn: F) -> F:
    """Launch on the query's GPU: Triton launches on the *current* device, which differs from the
    tensors' device on layers that accelerate placed on another GPU (``device_map="auto"``)."""

    @functools.wraps(fn)
    def wrapper(query: torch.Tensor, *args, **kwargs):
        if query.device.type != "cuda":
            return fn(query, *args, **kwargs)
        with torch.cuda.device(query.device):
            return fn(query, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def rope_args(inv_freq: torch.Tensor, offsets: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``inv_freq`` and row offsets as the kernels read them: float32 and int32, contiguous, on ``device``."""
    return (
        inv_freq.to(device=device, dtype=torch.float32).contiguous(),
        offsets.to(device=device, dtype=torch.int32).contiguous(),
    )


def precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: float32 inputs get true fp32 products (tf32 would cost ~1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grouped_key: torch.Tensor | None = None
) -> None:
    """Refuse layouts the kernels would read wrongly, naming what is wrong."""
    if any(x.stride(-1) != 1 for x in (query, key, value, grouped_key) if x is not None):
        raise ValueError("the Triton SelfExtend kernels need the head dimension contiguous")
    if grouped_key is not None and grouped_key.shape[:3] != key.shape[:3]:
        raise ValueError(f"grouped keys {tuple(grouped_key.shape)} do not match keys {tuple(key.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} KV heads")


def valid_arg(key_valid: torch.Tensor | None, query: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """``(tensor, row stride, HAS_VALID)`` for a key-padding mask; any tensor stands in when there is none."""
    if key_valid is None:
        return query, 0, False  # never read
    valid = key_valid.to(device=query.device, dtype=torch.int8).contiguous()
    return valid, valid.stride(0), True


@functools.cache
def _prefill_blocks(head_dim: int, dtype: torch.dtype, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), tuned on an H100 for bf16."""
    if interpret:
        return 32, 16, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 64, 8, 3  # best of the sweep in benchmarks/triton_blocks.py (H100)
    return 64, 32, 4, 2  # head dim 256 (Gemma 3): smaller tiles to fit shared memory; not yet timed


def launch_blocks(
    dim: int, dtype: torch.dtype, block_m: int | None, block_n: int | None, warps: int | None, stages: int | None
) -> tuple[int, int, int, int]:
    """The tuned prefill launch settings, each overridable by the caller (sweeps, tests)."""
    bm, bn, w, st = _prefill_blocks(dim, dtype, interpreted())
    return block_m or bm, block_n or bn, warps or w, stages or st


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
