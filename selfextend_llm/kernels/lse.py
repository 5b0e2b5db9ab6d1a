"""Attention kernels that also return the log-sum-exp of each query row.

SelfExtend splits each query's keys into a neighbor part and a grouped part that must share one
softmax.  Any attention kernel that returns the row log-sum-exp (LSE) can compute the parts
separately; :func:`merge_partials` then combines them exactly.  One small function per
backend, as in transformers' ``integrations/sdpa_attention.py``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Literal

import torch

#: The per-block kernels: ``"auto"`` picks the fused one for the device (and ``"math"`` for
#: softcapping or gradients); the others force one, for tests and comparisons.
Kernel = Literal["auto", "math", "cpu_flash", "cuda_efficient"]

NEG_INF = float("-inf")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim), as transformers does."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _finish(out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark rows with no visible key: LSE -inf and output 0, whatever the kernel wrote there."""
    if mask is not None:
        # Unconditional (no ``if empty.any()``): a host sync here would stop decode steps from
        # compiling into one graph, and the two fills cost little next to the attention.
        empty = ~mask.any(dim=-1)  # (b|1, 1|h, q)
        lse = lse.masked_fill(empty, NEG_INF)
        out = out.masked_fill(empty[..., None], 0.0)
    return out, lse


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference kernel: explicit scores for one query block, float32 softmax."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return _explicit_softmax(scores, v, mask, softcap)


def _explicit_softmax(
    scores: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled float32 scores to (output, row LSE): softcap, mask, one softmax, values (already repeated)."""
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.matmul(torch.exp(scores - safe[..., None]), v.float())
    return _finish(out, lse, mask)


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """``(1, 1, q_len, k_len)`` boolean: query ``t`` sees keys ``0..t`` (top-left aligned)."""
    return (torch.arange(k_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None])[None, None]


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, NEG_INF)


def cpu_flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's fused CPU flash kernel, which returns the LSE and handles GQA natively."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=_additive(mask, q.dtype), scale=scale
    )
    return _finish(out, lse.float(), mask)


def cuda_efficient_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's memory-efficient CUDA kernel with ``compute_log_sumexp``.

    Its bias must be 16-element aligned in the key dimension, so the bias is built padded and
    sliced back to a view.
    """
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    bias = None
    if mask is not None:
        lq, lk = q.shape[2], mask.shape[-1]
        mask = mask.expand(mask.shape[0], 1, lq, lk)
        padded = (lk + 15) // 16 * 16
        full = torch.zeros((mask.shape[0], 1, lq, padded), dtype=q.dtype, device=q.device)
        full[..., :lk].masked_fill_(~mask, NEG_INF)
        bias = full[..., :lk].expand(q.shape[0], q.shape[1], lq, lk)
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, False, scale=scale
    )
    return _finish(out, lse[..., : q.shape[2]].float(), mask)


class NoFusedCausalKernel(RuntimeError):
    """No fused causal kernel runs these inputs and explicit scores would be too large."""


#: Largest explicit score matrix (bytes) the fallback of :func:`causal_attention_lse` builds.
MATH_FALLBACK_BYTES = 256 * 2**20
#: (kernel, dtype, head dim) of fused causal kernels that raised here; not tried again.
_FAILED_CAUSAL: set[tuple[str, torch.dtype, int]] = set()


def plan_length(n: int) -> int:
    """``n`` rounded up to one of 32 lengths per octave (at most 1/32 more): the lengths cuDNN attention plans for.

    cuDNN builds an execution plan for every new sequence length (~50 ms on an H100, measured), so a server
    whose prompts all differ in length would pay it on nearly every prefill; padded to these lengths, a plan
    is built once per bucket and causal attention of the padding costs at most ~6% more.
    """
    if n <= 256:
        return -(-n // 64) * 64
    step = 1 << (n.bit_length() - 6)
    return -(-n // step) * step


def _cudnn_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
    n = q.shape[2]
    pad = plan_length(n) - n
    if pad:  # causal: the real rows never see the padded keys at the end, so cutting them off is exact
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    out, lse = cudnn(q, k, v, None, True, 0.0, True, False, scale=scale)[:2]
    return out[:, :, :n], lse.reshape(q.shape[:3])[:, :, :n]


def _flash_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[:2]
    return out, lse


def _fa3_function() -> Callable | None:
    """vLLM's FlashAttention 3 varlen function, where vLLM is already imported (inside a vLLM engine: importing
    vLLM only for this would cost seconds in every other process), else None."""
    if "vllm" not in sys.modules:
        return None
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:  # the CPU build, or a CUDA build without it
        return None
    return flash_attn_varlen_func


def _fa3_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """One sequence (``1, heads, n, d``, any strides with a unit last one) on vLLM's FA3: plain vLLM's own kernel,
    faster than cuDNN on the grouped part (0.55 ms against 0.75 ms at 16k tokens on an H100)."""
    fa = _fa3_function()
    if fa is None:
        raise RuntimeError("vLLM's FlashAttention 3 is not available")
    n = q.shape[2]
    cu = torch.arange(2, device=q.device, dtype=torch.int32) * n  # on the device: no host copy, no sync
    out, lse = fa(
        q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), max_seqlen_q=n, cu_seqlens_q=cu,
        max_seqlen_k=n, cu_seqlens_k=cu, softmax_scale=scale, causal=True, return_softmax_lse=True, fa_version=3,
    )  # fmt: skip
    return out.transpose(0, 1).unsqueeze(0), lse.unsqueeze(0)


def agrees_with_math(
    kernel: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, rows: int = 128
) -> bool:
    """Whether ``kernel`` (square causal attention with row LSE) matches the explicit formula on the first ``rows``
    queries and keys of this very call (causal: they depend on nothing later), with its layout and strides.

    A kernel taken from another package is checked once before it is trusted, so a layout or API difference falls
    back to the next kernel instead of corrupting answers.
    """
    n = min(rows, q.shape[2])
    q, k, v = q[:, :, :n], k[:, :, :n], v[:, :, :n]
    out, lse = kernel(q, k, v, scale)
    ref, ref_lse = math_attention(q.float(), k.float(), v.float(), causal_mask(n, n, q.device), scale)
    tol = 1e-4 if q.dtype == torch.float32 else 3e-2
    return (
        tuple(out.shape) == tuple(ref.shape)
        and bool(((out.float() - ref).abs().max() < tol).item())
        and bool(((lse.float().reshape(ref_lse.shape) - ref_lse).abs().max() < tol).item())
    )


#: (kernel, dtype, head dim, heads, kv heads) of kernels from other packages that passed :func:`agrees_with_math`
_CHECKED: set[tuple] = set()


def causal_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Square causal attention (query ``t`` sees keys ``0..t``) with the row LSE (natural log).

    On CUDA in half precision, inside a vLLM engine, vLLM's FlashAttention 3 (checked once against the formula);
    otherwise the kernel plain SDPA itself picks on Hopper (cuDNN, padded to :func:`plan_length`;
    FlashAttention-2 where cuDNN attention is missing), all of which take grouped-query K/V
    without repeating them, so SelfExtend's grouped part runs as fast as plain causal attention
    of that length.  Elsewhere (float32, tests in Triton's interpreter) it is the explicit-scores
    kernel, whose memory grows with the square of the length.
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        kernels = (("fa3", _fa3_causal), ("cudnn", _cudnn_causal), ("flash", _flash_causal))
        for name, kernel in kernels:
            key = (name, q.dtype, q.shape[-1])
            if key in _FAILED_CAUSAL or (name == "fa3" and (q.shape[0] != 1 or _fa3_function() is None)):
                continue
            if name == "fa3":  # another package's kernel: checked once, any failure falls back
                try:
                    if (checked := (*key, q.shape[1], k.shape[1])) not in _CHECKED:
                        if not agrees_with_math(kernel, q, k, v, scale):
                            raise RuntimeError("its output differs from the formula's")
                        _CHECKED.add(checked)
                    return kernel(q, k, v, scale)
                except torch.OutOfMemoryError:
                    raise
                except Exception as err:  # noqa: BLE001 - e.g. another vLLM's signature: use the next kernel
                    warnings.warn(f"vLLM's FlashAttention 3 not used ({type(err).__name__}: {err})", stacklevel=2)
                    _FAILED_CAUSAL.add(key)
                    continue
            try:
                return kernel(q, k, v, scale)
            except torch.OutOfMemoryError:
                raise  # a real failure of this call, not of the kernel: say so, do not fall back
            except RuntimeError:  # not built for this GPU, dtype or head dim: remembered, next kernel
                _FAILED_CAUSAL.add(key)
    n = k.shape[2]
    if q.shape[0] * q.shape[1] * q.shape[2] * n * 4 > MATH_FALLBACK_BYTES:
        raise NoFusedCausalKernel(
            f"no fused causal attention kernel for {q.dtype} head dim {q.shape[-1]} on {q.device}, and "
            f"{q.shape[2]}x{n} explicit scores per head are too large"
        )
    out, lse = math_attention(q, k, v, causal_mask(q.shape[2], n, q.device), scale)
    return out.to(q.dtype), lse


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
    kernel: Kernel = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and row LSE for one query block, on the best kernel for the device.

    ``mask`` is boolean, broadcastable to ``(batch, 1, q, k)``, True where a key is visible.
    Rows with no visible key come back with LSE ``-inf`` and output 0, so they drop out of the
    merge.  ``kernel`` is one of :data:`Kernel`.
    """
    if k.shape[2] == 0:
        shape = q.shape[:3]
        return q.new_zeros(q.shape), torch.full(shape, NEG_INF, device=q.device)
    n_rep = q.shape[1] // k.shape[1]
    if q.shape[2] == 1 and n_rep > 1 and (mask is None or mask.shape[-2] == 1):
        # One query (decoding): fold the query heads of each KV head into the query axis, so no
        # kernel needs the cache repeated per query head.
        b, h, _, d = q.shape
        packed = q.reshape(b, k.shape[1], n_rep, d)
        out, lse = attention_with_lse(packed, k, v, mask, scale, softcap, kernel)
        return out.reshape(b, h, 1, d), lse.reshape(b, h, 1)
    if kernel == "auto":
        if softcap is not None or q.requires_grad:
            kernel = "math"
        elif q.device.type == "cpu":
            kernel = "cpu_flash"
        elif q.device.type == "cuda":
            kernel = "cuda_efficient"
        else:
            kernel = "math"
    if kernel == "math":
        return math_attention(q, k, v, mask, scale, softcap)
    if softcap is not None:
        raise ValueError(f"kernel {kernel!r} does not support logit softcapping; use 'math'")
    if kernel == "cpu_flash":
        return cpu_flash_attention(q, k, v, mask, scale)
    if kernel == "cuda_efficient":
        return cuda_efficient_attention(q, k, v, mask, scale)
    raise ValueError(f"unknown attention kernel {kernel!r}")


def two_score_attention(
    q_far: torch.Tensor,
    k_far: torch.Tensor,
    q_near: torch.Tensor,
    k_near: torch.Tensor,
    v: torch.Tensor,
    use_far: torch.Tensor,
    visible: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit scores over one small key range seen two ways: ``far`` scores where ``use_far``, else ``near``.

    For the window's edge of a query block (at most ``B x B``), where each row switches from
    grouped to plain scores at its own key: one pass with both score matrices and one softmax,
    instead of two masked fused calls over the same keys.  ``visible`` (padding, custom masks)
    is True where a key may be seen.  Returns the output and the row LSE, float32.
    """
    n_rep = q_far.shape[1] // k_far.shape[1]
    k_far, k_near, v = repeat_kv(k_far, n_rep), repeat_kv(k_near, n_rep), repeat_kv(v, n_rep)
    far = torch.matmul(q_far.float(), k_far.float().transpose(-1, -2))
    near = torch.matmul(q_near.float(), k_near.float().transpose(-1, -2))
    return _explicit_softmax(torch.where(use_far, far, near) * scale, v, visible, softcap)


def causal_block_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
    kernel: Kernel = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A square diagonal block (query ``t`` sees keys ``0..t``) with its row LSE.

    On the CPU with nothing else to mask, this is the fused flash kernel's own causal mode: no
    mask tensor is built and the kernel skips the upper triangle.  Otherwise the causal mask is
    combined with ``mask`` (padding, custom masks) and the block goes through :func:`attention_with_lse`.
    """
    n = q.shape[2]
    fused = kernel in ("auto", "cpu_flash") and q.device.type == "cpu" and softcap is None and not q.requires_grad
    if mask is None and fused and k.shape[2] == n:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        return out, lse.float()
    causal = causal_mask(n, k.shape[2], q.device)
    return attention_with_lse(q, k, v, causal if mask is None else mask & causal, scale, softcap, kernel)


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """Combine attention over disjoint key sets into attention over their union.

    With ``o_i = softmax-weighted values over key set i`` and ``l_i`` its LSE, the union's
    output is ``sum_i exp(l_i - L) o_i`` with ``L = logsumexp_i l_i``: exactly one softmax over
    all keys.  Rows empty in every part (left padding) come out as zeros.
    """
    if len(parts) == 1:
        return parts[0][0].to(dtype)
    lses = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    out = None
    for o, lse in parts:
        term = o.float() * torch.exp(lse - total)[..., None]
        out = term if out is None else out + term
    return out.to(dtype)
