"""SelfExtend's CPU decode step on the C kernels of ``decode.c``: scores, PyTorch's softmax, values.

The same computation as :func:`selfextend_llm.kernels.blocks.decode_explicit` (keys before
``boundary`` scored grouped, the rest plainly, one softmax, the values read once), which is
what runs wherever this returns None: another dtype or device, autograd, a compiled graph,
rows that are not contiguous, or no compiler.
"""

from __future__ import annotations

import torch

from ..lse import NEG_INF
from . import library

TASKS_PER_THREAD = 4  # key chunks per thread, so that 3 KV heads still spread over 2+ threads
MIN_CHUNK = 256  # keys: below this a task costs more to start than to run


def _rows_contiguous(x: torch.Tensor) -> bool:
    """Row ``j`` of every (batch, head) at ``base + j * dim``: what the kernels index."""
    return x.shape[2] <= 1 or (x.stride(-1) == 1 and x.stride(-2) == x.shape[-1])


def fits(query: torch.Tensor, key: torch.Tensor, grouped_key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the C kernels can take this call (else the caller's PyTorch path runs)."""
    tensors = (query, key, grouped_key, value)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not torch.compiler.is_compiling()
        and query.shape[2] == 1
        and query.shape[1] % key.shape[1] == 0
        and grouped_key.shape[-1] == key.shape[-1] == query.shape[-1]
        and all(_rows_contiguous(t) for t in (key, grouped_key, value))
    )


def _chunk(n: int, groups: int) -> int:
    tasks = max(1, -(-TASKS_PER_THREAD * torch.get_num_threads() // groups))
    return max(MIN_CHUNK, -(-n // tasks))


def decode_attention(
    query: torch.Tensor,
    grouped_query: torch.Tensor,
    key: torch.Tensor,
    grouped_key: torch.Tensor,
    value: torch.Tensor,
    boundary: int,
    key_valid: torch.Tensor | None,
    scale: float,
) -> torch.Tensor | None:
    """One query per row (``b, h, 1, d``) over ``key``/``value`` (``b, kv_h, n, d``): ``(b, h, 1, d_v)``.

    Keys ``[0, boundary)`` are scored with ``grouped_query`` against ``grouped_key`` (which must
    hold at least those rows), the rest with ``query`` against ``key``.  ``key_valid`` (``b, >= n``)
    marks real keys; a row with none gets zeros.  Returns None where the kernels cannot run.
    """
    lib = library()
    if lib is None or not fits(query, key, grouped_key, value):
        return None
    bsz, kv_heads, n, dim = key.shape
    heads, dim_v = query.shape[1], value.shape[-1]
    rows = heads // kv_heads
    boundary = max(0, min(boundary, n))
    if boundary > grouped_key.shape[2] or grouped_key.shape[:2] != key.shape[:2]:
        return None  # not the rows the kernel would read: let the PyTorch path raise its own error
    q = query.reshape(bsz, kv_heads, rows, dim).contiguous()
    gq = grouped_query.reshape(bsz, kv_heads, rows, dim).contiguous()
    threads = torch.get_num_threads()
    chunk = _chunk(n, bsz * kv_heads)
    scores = torch.empty(bsz, kv_heads, rows, n, device="cpu")
    gk = grouped_key if boundary > 0 else key  # never read below an empty boundary
    lib.se_decode_scores(
        bsz, kv_heads, rows, dim, n, boundary, q.data_ptr(), gq.data_ptr(),
        key.data_ptr(), key.stride(0), key.stride(1), gk.data_ptr(), gk.stride(0), gk.stride(1),
        scale, chunk, threads, scores.data_ptr(),
    )  # fmt: skip
    if key_valid is not None:
        scores.masked_fill_(~key_valid[:, None, None, :n], NEG_INF)
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # a row of padding only: zeros
    chunks = -(-n // chunk)
    partial = torch.empty(bsz * kv_heads, chunks, rows, dim_v, device="cpu")
    lib.se_decode_values(
        bsz, kv_heads, rows, dim_v, n, probs.data_ptr(), value.data_ptr(), value.stride(0), value.stride(1),
        chunk, threads, partial.data_ptr(),
    )  # fmt: skip
    return partial.sum(1).reshape(bsz, heads, 1, dim_v)
