"""GPU SelfExtend in Triton: the one-pass prefill, split-K decoding and the grouped re-rotation.

A whole unpadded prefill goes through :mod:`split_prefill` instead (most of its work on the fused
kernel plain SDPA uses); it builds on the rotation kernel and the key-block step defined here.

Prefill chunks and padded batches take the one-pass kernel (:func:`prefill`): each program owns
a block of queries and walks the key blocks in four ranges:

* keys every query of the block sees grouped: only the grouped product is computed;
* keys at the window edge: both products, picked per entry by distance;
* keys inside every query's window: only the plain product;
* the causal diagonal: the plain product under the causal mask.

So each query meets each key once (twice only on the few blocks straddling the window edge), as
in one causal flash attention, and the two score kinds share one online softmax: no log-sum-exp
merge, no partial outputs.  The grouped rotation of the query block (``p // G + W - W // G - p``)
is applied in registers to the already-rotated states with the model's ``inv_freq``; keys are
read pre-rotated to ``p // G``.

Decoding one token is a split-K ("flash-decoding") kernel: the query heads that share a KV head
are packed into one tile, the cache is cut into splits processed in parallel, and a second
small kernel merges the splits.  There each key is met once per step, so its grouped rotation
is done in registers and no grouped copy of the cache is kept.

Supported: the "half" RoPE layout with rotary dim == head dim, head dims that are powers of two,
no logit softcapping, no extra mask beyond key padding.  Anything else takes the flex/SDPA paths.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU builds lack it.
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = None
    tl = None

    class OutOfResources(RuntimeError):  # type: ignore[no-redef]
        """Stand-in so that callers can name the exception without Triton installed."""


#: (head_dim, dtype) pairs whose kernels did not fit the GPU; they take the other paths from then on.
_DISABLED: set[tuple[int, torch.dtype]] = set()


def disable(head_dim: int, dtype: torch.dtype) -> None:
    """Stop using the kernels for this shape (after a launch ran out of shared memory or registers)."""
    _DISABLED.add((head_dim, dtype))


LOG2E = 1.4426950408889634


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil division (``triton.cdiv`` is a jitted function: ~10 us per host call)."""
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests on machines without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreted())


def supports(head_dim: int, rotary_dim: int, layout: str, dtype: torch.dtype) -> bool:
    """Shapes and layouts the kernels handle; the caller falls back to the other paths otherwise."""
    return (
        layout == "half"
        and (head_dim, dtype) not in _DISABLED
        and rotary_dim == head_dim
        and head_dim in (32, 64, 128, 256)
        and dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


if triton is not None:
    #: Scores of hidden keys: finite, so fully masked rows do not turn into NaN mid-loop.
    _HIDDEN = tl.constexpr(-1.0e30)

    @triton.jit
    def _floordiv(a, b):
        """Floor division for possibly negative ints (Triton's ``//`` truncates toward zero)."""
        q = a // b
        return tl.where((a % b != 0) & ((a < 0) != (b < 0)), q - 1, q)

    @triton.jit
    def _rotate_rows(x1, x2, delta, inv):
        """Rotate half-layout rows ``(x1, x2)`` [M, HALF] by ``delta`` [M] positions."""
        ang = delta.to(tl.float32)[:, None] * inv[None, :]
        c = tl.cos(ang)
        s = tl.sin(ang)
        return x1 * c - x2 * s, x2 * c + x1 * s

    @triton.jit
    def _cos_sin(ang, FAST: tl.constexpr):
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
    def _rotate_cols(x1, x2, delta, inv, FAST: tl.constexpr):
        """Rotate transposed half-layout keys ``(x1, x2)`` [HALF, N] by ``delta`` [N] positions."""
        ang = inv[:, None] * delta.to(tl.float32)[None, :]
        c, s = _cos_sin(ang, FAST)
        return x1 * c - x2 * s, x2 * c + x1 * s

    @triton.jit
    def _queries(q_ptr, row_ok, pos, INV, G, W, HALF: tl.constexpr):
        """Load a query tile (two halves) and rotate it to its grouped positions ``p // G + W - W // G``."""
        q1 = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
        q2 = tl.load(q_ptr + HALF, mask=row_ok[:, None], other=0.0)
        inv = tl.load(INV + tl.arange(0, HALF))
        shift = _floordiv(pos, G) + (W - W // G) - pos
        qg1, qg2 = _rotate_rows(q1.to(tl.float32), q2.to(tl.float32), shift, inv)
        return q1, q2, qg1.to(q1.dtype), qg2.to(q1.dtype), inv

    @triton.jit
    def _block(
        acc,
        m_i,
        l_i,
        q1,
        q2,
        qg1,
        qg2,
        i_idx,
        K_ptr,
        KG_ptr,
        V_ptr,
        VALID_ptr,
        inv,
        off_b,
        n0,
        n_end,
        stride_kn,
        stride_kgn,
        stride_vn,
        G,
        W,
        qk_scale,
        HALF: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MODE: tl.constexpr,
        HAS_VALID: tl.constexpr,
        PREC: tl.constexpr,
        ROTATE: tl.constexpr,
        FAST: tl.constexpr = False,
    ):
        """One key block of the online softmax.

        MODE 0: all grouped, no mask.  1: all plain, no mask.  2: both products, picked by
        distance, causal mask.  3: plain product, causal mask.  4: plain product inside the window
        only (``0 <= distance < W``; the grouped part is computed elsewhere).  ROTATE: grouped keys are made
        from the cached keys in registers (decoding: each key is met once per step) instead of
        read from ``KG_ptr`` (prefill: each key block is met by every query block).
        """
        j = n0 + tl.arange(0, BLOCK_N)
        in_range = j < n_end
        d = tl.arange(0, HALF)
        if ROTATE or MODE != 0:
            kp = K_ptr + j[None, :] * stride_kn + d[:, None]
            k1 = tl.load(kp, mask=in_range[None, :], other=0.0)
            k2 = tl.load(kp + HALF, mask=in_range[None, :], other=0.0)
        if MODE == 0 or MODE == 2:
            if ROTATE:
                pos = j - off_b
                kg1, kg2 = _rotate_cols(k1.to(tl.float32), k2.to(tl.float32), _floordiv(pos, G) - pos, inv, FAST)
                kg1 = kg1.to(qg1.dtype)
                kg2 = kg2.to(qg2.dtype)
            else:
                kgp = KG_ptr + j[None, :] * stride_kgn + d[:, None]
                kg1 = tl.load(kgp, mask=in_range[None, :], other=0.0)
                kg2 = tl.load(kgp + HALF, mask=in_range[None, :], other=0.0)
            s_g = tl.dot(qg1, kg1, input_precision=PREC)
            s_g = tl.dot(qg2, kg2, s_g, input_precision=PREC)
        if MODE != 0:
            s_n = tl.dot(q1, k1, input_precision=PREC)
            s_n = tl.dot(q2, k2, s_n, input_precision=PREC)
        if MODE == 0:
            s = s_g
        elif MODE != 2:
            s = s_n
        else:
            dist = i_idx[:, None] - j[None, :]
            s = tl.where(dist < W, s_n, s_g)
        s = s * qk_scale
        if MODE >= 2:
            dist = i_idx[:, None] - j[None, :]
            seen = (dist >= 0) & in_range[None, :]
            if MODE == 4:
                seen = seen & (dist < W)
            s = tl.where(seen, s, _HIDDEN)
        if HAS_VALID:
            ok = tl.load(VALID_ptr + j, mask=in_range, other=0)
            s = tl.where(ok[None, :] != 0, s, _HIDDEN)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_ptr + j[:, None] * stride_vn + tl.arange(0, 2 * HALF)[None, :], mask=in_range[:, None], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        return acc, m_new, l_i

    @triton.jit
    def _prefill_kernel(
        Q,
        K,
        KG,
        V,
        OUT,
        INV,
        OFF,
        VALID,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kgb,
        stride_kgh,
        stride_kgn,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_ob,
        stride_oh,
        stride_om,
        stride_valid_b,
        n_heads,
        q_len,
        q_start,
        G,
        W,
        qk_scale,
        HEADS_PER_KV: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DIAG_GROUPED: tl.constexpr,
        HAS_VALID: tl.constexpr,
        PREC: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        kvh = h // HEADS_PER_KV
        off_b = tl.load(OFF + b)

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        i_idx = q_start + rows
        d = tl.arange(0, HALF)
        q_ptr = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + d[None, :]
        q1, q2, qg1, qg2, inv = _queries(q_ptr, row_ok, i_idx - off_b, INV, G, W, HALF)

        m_i = tl.full([BLOCK_M], _HIDDEN, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, 2 * HALF], dtype=tl.float32)

        k_off = K + b * stride_kb + kvh * stride_kh
        kg_off = KG + b * stride_kgb + kvh * stride_kgh
        v_off = V + b * stride_vb + kvh * stride_vh
        valid_off = VALID + b * stride_valid_b
        first = q_start + pid_m * BLOCK_M
        last = tl.minimum(first + BLOCK_M, q_start + q_len) - 1
        end = last + 1
        # [0, g_end): grouped for every row; [g_end, n_lo): window edge; [n_lo, n_hi): inside every
        # row's window and causally visible; [n_hi, end): the diagonal.
        g_end = (tl.maximum(first - W + 1, 0) // BLOCK_N) * BLOCK_N
        n_lo = tl.maximum(g_end, ((tl.maximum(last - W + 1, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
        n_hi = tl.maximum(n_lo, ((first + 1) // BLOCK_N) * BLOCK_N)
        n_lo = tl.minimum(n_lo, end)
        n_hi = tl.minimum(n_hi, end)
        for n0 in range(0, g_end, BLOCK_N):
            acc, m_i, l_i = _block(
                acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, k_off, kg_off, v_off, valid_off, inv, off_b, n0, end,
                stride_kn, stride_kgn, stride_vn, G, W, qk_scale, HALF, BLOCK_N, 0, HAS_VALID, PREC, False,
            )  # fmt: skip
        for n0 in range(g_end, n_lo, BLOCK_N):
            acc, m_i, l_i = _block(
                acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, k_off, kg_off, v_off, valid_off, inv, off_b, n0, end,
                stride_kn, stride_kgn, stride_vn, G, W, qk_scale, HALF, BLOCK_N, 2, HAS_VALID, PREC, False,
            )  # fmt: skip
        for n0 in range(n_lo, n_hi, BLOCK_N):
            acc, m_i, l_i = _block(
                acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, k_off, kg_off, v_off, valid_off, inv, off_b, n0, end,
                stride_kn, stride_kgn, stride_vn, G, W, qk_scale, HALF, BLOCK_N, 1, HAS_VALID, PREC, False,
            )  # fmt: skip
        for n0 in range(n_hi, end, BLOCK_N):
            acc, m_i, l_i = _block(
                acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, k_off, kg_off, v_off, valid_off, inv, off_b, n0, end,
                stride_kn, stride_kgn, stride_vn, G, W, qk_scale, HALF, BLOCK_N,
                2 if DIAG_GROUPED else 3, HAS_VALID, PREC, False,
            )  # fmt: skip
        seen = m_i > _HIDDEN / 2
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        out = tl.where(seen[:, None], out, 0.0)
        o_ptr = OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + tl.arange(0, 2 * HALF)[None, :]
        tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _decode_kernel(
        Q,
        K,
        V,
        O_PART,
        M_PART,
        L_PART,
        INV,
        OFF,
        VALID,
        LENGTHS,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_valid_b,
        n_kv_heads,
        n_keys,
        split_len,
        n_splits,
        G,
        W,
        qk_scale,
        HEADS_PER_KV: tl.constexpr,
        ROWS: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_VALID: tl.constexpr,
        HAS_LENGTHS: tl.constexpr,
        PREC: tl.constexpr,
        FAST: tl.constexpr,
    ):
        pid_bk = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bk // n_kv_heads
        kvh = pid_bk % n_kv_heads
        off_b = tl.load(OFF + b)
        if HAS_LENGTHS:
            # a static cache: the row's keys end at its query's slot, not at the buffer's end
            n_keys = tl.load(LENGTHS + b)

        r = tl.arange(0, ROWS)
        row_ok = r < HEADS_PER_KV
        h = kvh * HEADS_PER_KV + r
        d = tl.arange(0, HALF)
        q_ptr = Q + b * stride_qb + h[:, None] * stride_qh + d[None, :]
        i_idx = tl.zeros([ROWS], dtype=tl.int32) + (n_keys - 1)
        q1, q2, qg1, qg2, inv = _queries(q_ptr, row_ok, i_idx - off_b, INV, G, W, HALF)

        m_i = tl.full([ROWS], _HIDDEN, dtype=tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, 2 * HALF], dtype=tl.float32)
        k_off = K + b * stride_kb + kvh * stride_kh
        v_off = V + b * stride_vb + kvh * stride_vh
        valid_off = VALID + b * stride_valid_b

        lo = split * split_len
        hi = tl.minimum(lo + split_len, n_keys)
        # Keys before g_lim are all grouped for the single query; the block holding g_lim straddles.
        g_lim = tl.maximum(n_keys - W, 0)
        a_end = tl.minimum(tl.maximum((g_lim // BLOCK_N) * BLOCK_N, lo), hi)
        b_end = tl.minimum(tl.maximum(((g_lim + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, a_end), hi)
        for n0 in range(lo, a_end, BLOCK_N):
            acc, m_i, l_i = _block(
                acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, k_off, k_off, v_off, valid_off, inv, off_b, n0, hi,
                stride_kn, stride_kn, stride_vn, G, W, qk_scale, HALF, BLOCK_N, 0, HAS_VALID, PREC, True, FAST,
            )  # fmt: skip
        for n0 in range(a_end, b_end, BLOCK_N):
            acc, m_i, l_i = _block(
                acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, k_off, k_off, v_off, valid_off, inv, off_b, n0, hi,
                stride_kn, stride_kn, stride_vn, G, W, qk_scale, HALF, BLOCK_N, 2, HAS_VALID, PREC, True, FAST,
            )  # fmt: skip
        for n0 in range(b_end, hi, BLOCK_N):
            acc, m_i, l_i = _block(
                acc, m_i, l_i, q1, q2, qg1, qg2, i_idx, k_off, k_off, v_off, valid_off, inv, off_b, n0, hi,
                stride_kn, stride_kn, stride_vn, G, W, qk_scale, HALF, BLOCK_N, 3, HAS_VALID, PREC, True, FAST,
            )  # fmt: skip
        part = (b * n_kv_heads * HEADS_PER_KV + h) * n_splits + split
        tl.store(M_PART + part, m_i, mask=row_ok)
        tl.store(L_PART + part, l_i, mask=row_ok)
        dd = tl.arange(0, 2 * HALF)
        tl.store(O_PART + part[:, None] * (2 * HALF) + dd[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _decode_merge_kernel(O_PART, M_PART, L_PART, OUT, n_splits, SPLITS: tl.constexpr, DIM: tl.constexpr):
        """Merge the splits of one (batch, head): one softmax over all of them."""
        bh = tl.program_id(0)
        s = tl.arange(0, SPLITS)
        ok = s < n_splits
        m = tl.load(M_PART + bh * n_splits + s, mask=ok, other=_HIDDEN)
        l_part = tl.load(L_PART + bh * n_splits + s, mask=ok, other=0.0)
        m_all = tl.max(m, 0)
        w = tl.where(ok, tl.math.exp2(m - m_all), 0.0)
        denom = tl.sum(w * l_part, 0)
        dd = tl.arange(0, DIM)
        parts = tl.load(O_PART + (bh * n_splits + s)[:, None] * DIM + dd[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(parts * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
        out = tl.where(m_all > _HIDDEN / 2, out, 0.0)
        tl.store(OUT + bh * DIM + dd, out.to(OUT.dtype.element_ty))

    @triton.jit
    def _rotate_kernel(
        X,
        OUT,
        Y,
        OUT_Y,
        INV,
        OFF,
        stride_xb,
        stride_xh,
        stride_xn,
        stride_ob,
        stride_oh,
        stride_on,
        stride_yb,
        stride_yh,
        stride_yn,
        stride_pb,
        stride_ph,
        stride_pn,
        x_heads,
        y_heads,
        n_rows,
        x_index0,
        y_index0,
        G,
        W,
        X_QUERY: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK: tl.constexpr,
        HEADS: tl.constexpr,
        FAST: tl.constexpr,
    ):
        """Rotate rows of ``x`` (cache indices ``x_index0 + t``) to grouped positions, and in the
        same launch rows of keys ``y`` (``y_index0 + t``; head blocks past ``x``'s).

        A program owns a block of positions and ``HEADS`` heads of one sequence, so each
        cosine/sine serves several heads while the grid still fills the GPU.  The angle is formed
        in float64 and reduced modulo 2 pi before the float32 cosine, as in :func:`rope.rotate`.
        """
        pid = tl.program_id(0)
        b = tl.program_id(1)
        hb = tl.program_id(2)
        x_blocks = (x_heads + HEADS - 1) // HEADS
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        ok = rows < n_rows
        if hb < x_blocks:
            src, dst, n_heads, h0, index0 = X, OUT, x_heads, hb * HEADS, x_index0
            sb, sh, sn, db, dh, dn = stride_xb, stride_xh, stride_xn, stride_ob, stride_oh, stride_on
        else:
            src, dst, n_heads, h0, index0 = Y, OUT_Y, y_heads, (hb - x_blocks) * HEADS, y_index0
            sb, sh, sn, db, dh, dn = stride_yb, stride_yh, stride_yn, stride_pb, stride_ph, stride_pn
        pos = index0 + rows - tl.load(OFF + b)
        shift = _floordiv(pos, G) - pos
        if X_QUERY:
            shift += tl.where(hb < x_blocks, W - W // G, 0)
        d = tl.arange(0, HALF)
        ang = shift.to(tl.float64)[:, None] * tl.load(INV + d).to(tl.float64)[None, :]
        ang = (ang - tl.floor(ang / 6.283185307179586 + 0.5) * 6.283185307179586).to(tl.float32)
        c, s = _cos_sin(ang, FAST)
        for hh in range(HEADS):
            h = h0 + hh
            live = ok[:, None] & (h < n_heads)
            xp = src + b * sb + h * sh + rows[:, None] * sn + d[None, :]
            op = dst + b * db + h * dh + rows[:, None] * dn + d[None, :]
            x1 = tl.load(xp, mask=live, other=0.0).to(tl.float32)
            x2 = tl.load(xp + HALF, mask=live, other=0.0).to(tl.float32)
            tl.store(op, (x1 * c - x2 * s).to(dst.dtype.element_ty), mask=live)
            tl.store(op + HALF, (x2 * c + x1 * s).to(dst.dtype.element_ty), mask=live)


def _on_query_device(fn):
    """Launch on the query's GPU: Triton launches on the *current* device, which differs from the
    tensors' device on layers that accelerate placed on another GPU (``device_map="auto"``)."""

    @functools.wraps(fn)
    def wrapper(query: torch.Tensor, *args, **kwargs):
        if query.device.type != "cuda":
            return fn(query, *args, **kwargs)
        with torch.cuda.device(query.device):
            return fn(query, *args, **kwargs)

    return wrapper


def _rope_args(
    inv_freq: torch.Tensor, offsets: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``inv_freq`` and row offsets as the kernels read them: float32 and int32, contiguous, on ``device``."""
    return (
        inv_freq.to(device=device, dtype=torch.float32).contiguous(),
        offsets.to(device=device, dtype=torch.int32).contiguous(),
    )


def rotate_to_groups(
    x: torch.Tensor,
    offsets: torch.Tensor,
    *,
    index0: int,
    group_size: int,
    inv_freq: torch.Tensor,
    queries: bool,
    neighbor_window: int = 0,
    out: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    keys_index0: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (``b, h, n, d``, cache indices ``index0..``) re-rotated to grouped positions.

    Keys go from ``p`` to ``p // G``; queries (``queries=True``) to ``p // G + W - W // G``.
    ``out`` may be a strided view (the split prefill parks the grouped queries in its output).
    With ``keys`` (as many rows as ``x``, cache indices ``keys_index0..``), those are rotated as
    keys in the same launch and ``(out, rotated keys)`` is returned.
    """
    bsz, heads, n, dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    y = x if keys is None else keys
    if keys is not None and keys.shape[2] != n:
        raise ValueError(f"keys to rotate with the queries need {n} rows, got {keys.shape[2]}")
    out_y = out if keys is None else torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if n:
        interpret = interpreted()
        block, per_program = (16, 2) if interpret else (64, 2)
        inv, off = _rope_args(inv_freq, offsets, x.device)
        y_heads = 0 if keys is None else y.shape[1]
        head_blocks = _cdiv(heads, per_program) + _cdiv(y_heads, per_program)
        _rotate_kernel[(_cdiv(n, block), bsz, head_blocks)](
            x, out, y, out_y, inv, off,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
            y.stride(0), y.stride(1), y.stride(2), out_y.stride(0), out_y.stride(1), out_y.stride(2),
            heads, y_heads, n, index0, keys_index0, group_size, neighbor_window, X_QUERY=queries, HALF=dim // 2,
            BLOCK=block, HEADS=per_program, FAST=not interpret, num_warps=4,
        )  # fmt: skip
    return out if keys is None else (out, out_y)


@_on_query_device
def rotate_keys_to_groups(
    key: torch.Tensor, offsets: torch.Tensor, group_size: int, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Cached keys (``b, kv_h, n, d``) re-rotated from position ``p`` to ``p // G``."""
    return rotate_to_groups(key, offsets, index0=0, group_size=group_size, inv_freq=inv_freq, queries=False)


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get true fp32 products (tf32 would cost ~1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grouped_key: torch.Tensor | None = None
) -> None:
    if any(x.stride(-1) != 1 for x in (query, key, value, grouped_key) if x is not None):
        raise ValueError("the Triton SelfExtend kernels need the head dimension contiguous")
    if grouped_key is not None and grouped_key.shape[:3] != key.shape[:3]:
        raise ValueError(f"grouped keys {tuple(grouped_key.shape)} do not match keys {tuple(key.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} KV heads")


def _valid_arg(key_valid: torch.Tensor | None, query: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
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


def _launch_blocks(
    dim: int, dtype: torch.dtype, block_m: int | None, block_n: int | None, warps: int | None, stages: int | None
) -> tuple[int, int, int, int]:
    """The tuned prefill launch settings, each overridable by the caller (sweeps, tests)."""
    bm, bn, w, st = _prefill_blocks(dim, dtype, interpreted())
    return block_m or bm, block_n or bn, warps or w, stages or st


@_on_query_device
def prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    grouped_key: torch.Tensor | None = None,
    *,
    offsets: torch.Tensor,
    query_start: int,
    group_size: int,
    neighbor_window: int,
    inv_freq: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """SelfExtend attention of ``query`` (``b, h, q, d``) over ``key``/``value`` (``b, kv_h, n, d``).

    Query row ``t`` sits at cache index ``query_start + t`` and sees keys up to its own index.
    ``offsets`` (``b``) is each row's cache index minus RoPE position (left padding);
    ``key_valid`` (``b, n``) marks real keys.
    """
    if grouped_key is None:
        grouped_key = rotate_keys_to_groups(key, offsets, group_size, inv_freq)
    _check(query, key, value, grouped_key)
    bsz, heads, q_len, dim = query.shape
    out = torch.empty_like(query)
    if q_len == 0:
        return out
    bm, bn, warps, stages = _launch_blocks(dim, query.dtype, block_m, block_n, num_warps, num_stages)
    valid, valid_stride, has_valid = _valid_arg(key_valid, query)
    inv, off = _rope_args(inv_freq, offsets, query.device)
    grid = (_cdiv(q_len, bm), bsz * heads)
    _prefill_kernel[grid](
        query, key, grouped_key, value, out, inv, off, valid,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        grouped_key.stride(0), grouped_key.stride(1), grouped_key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        valid_stride, heads, q_len, query_start, group_size, neighbor_window, scale * LOG2E,
        HEADS_PER_KV=heads // key.shape[1], HALF=dim // 2, BLOCK_M=bm, BLOCK_N=bn,
        DIAG_GROUPED=neighbor_window < bm + bn, HAS_VALID=has_valid, PREC=_precision(query.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@_on_query_device
def decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    offsets: torch.Tensor,
    group_size: int,
    neighbor_window: int,
    inv_freq: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    block_n: int | None = None,
    splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    programs_per_sm: int = 4,
    blocks_per_split: int = 4,
    fast_trig: bool | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence (``b, h, 1, d``) against the whole cache: split-K SelfExtend decoding.

    ``lengths`` (``b``, a tensor) is for static caches, whose buffers run past the sequence: the
    row's query sits at slot ``lengths[b] - 1`` and later slots are never read.  Read on the GPU,
    so the launch needs no host sync and replays in a CUDA graph.

    Grouped keys are rotated in registers (each key is read once per step, so this costs a few
    sine/cosine evaluations per key, shared by the query heads of its KV head): no grouped copy
    of the cache is kept and nothing is re-rotated in memory.  ``fast_trig`` (default on the GPU)
    takes the hardware sine/cosine after an exact range reduction: libdevice's accurate ones made
    the step 3x slower than plain decoding on an H100, these bring it to ~1.1x at 64k tokens.
    The launch knobs default to the best of a sweep on an H100
    (``benchmarks/triton_blocks.py --kernel decode``).
    """
    _check(query, key, value)
    bsz, heads, q_len, dim = query.shape
    if q_len != 1:
        raise ValueError("decode() takes one query per sequence; use prefill() for more")
    kv_heads, n_keys = key.shape[1], key.shape[2]
    per_kv = heads // kv_heads
    interpret = interpreted()
    bn = block_n or (16 if interpret else 64)
    if splits is None:
        on_gpu = not interpret and query.device.type == "cuda"
        target = programs_per_sm * _sm_count(query.device.index or 0) if on_gpu else 128
        splits = max(1, min(_cdiv(n_keys, blocks_per_split * bn), _cdiv(target, bsz * kv_heads)))
    split_len = _cdiv(_cdiv(n_keys, splits), bn) * bn
    splits = _cdiv(n_keys, split_len)
    o_part = torch.empty((bsz * heads * splits, dim), device=query.device, dtype=torch.float32)
    m_part = torch.empty((bsz * heads * splits,), device=query.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    valid, valid_stride, has_valid = _valid_arg(key_valid, query)
    inv, off = _rope_args(inv_freq, offsets, query.device)
    lens = off if lengths is None else lengths.to(device=query.device, dtype=torch.int32).contiguous()
    _decode_kernel[(bsz * kv_heads, splits)](
        query, key, value, o_part, m_part, l_part, inv, off, valid, lens,
        query.stride(0), query.stride(1),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        valid_stride, kv_heads, n_keys, split_len, splits, group_size, neighbor_window, scale * LOG2E,
        HEADS_PER_KV=per_kv, ROWS=max(16, _next_pow2(per_kv)), HALF=dim // 2, BLOCK_N=bn,
        HAS_VALID=has_valid, HAS_LENGTHS=lengths is not None, PREC=_precision(query.dtype),
        FAST=not interpret if fast_trig is None else fast_trig, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    out = torch.empty((bsz, heads, 1, dim), device=query.device, dtype=query.dtype)
    _decode_merge_kernel[(bsz * heads,)](
        o_part, m_part, l_part, out, splits, SPLITS=max(2, _next_pow2(splits)), DIM=dim, num_warps=4
    )
    return out
