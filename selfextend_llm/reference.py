"""The straightforward two-score-matrix SelfExtend, in float64, for checking the fast paths.

It builds the full neighbor and grouped score matrices from *unrotated* states (rotating them
afresh to true and grouped positions), picks per entry by distance, and takes one softmax.
Quadratic in memory: for tests and benchmarks only.
"""

from __future__ import annotations

import torch

from .kernels.lse import repeat_kv
from .rope import Layout, grouped_key_position, grouped_query_position, rotate


def reference_selfextend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    group_size: int,
    neighbor_window: int,
    inv_freq: torch.Tensor,
    layout: Layout = "half",
    scale: float,
    mask: torch.Tensor | None = None,
    rotated: bool = True,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention output (``b, h, q, d``) by the formula.

    ``rotated=True`` means ``query``/``key`` already carry RoPE at their positions (as inside
    transformers); they are rotated back to position 0 first.  ``mask`` (``b|1, 1, q, n``) is
    True where a key may be seen; it defaults to causal by position.
    """
    q = query.double()
    k = repeat_kv(key, query.shape[1] // key.shape[1]).double()
    v = repeat_kv(value, query.shape[1] // value.shape[1]).double()
    bsz = q.shape[0]
    qp = query_positions.expand(bsz, -1).long()
    kp = key_positions.expand(bsz, -1).long()
    if rotated:
        q = rotate(q, -qp, inv_freq, layout)
        k = rotate(k, -kp, inv_freq, layout)
    qn, kn = rotate(q, qp, inv_freq, layout), rotate(k, kp, inv_freq, layout)
    qg = rotate(q, grouped_query_position(qp, group_size, neighbor_window), inv_freq, layout)
    kg = rotate(k, grouped_key_position(kp, group_size), inv_freq, layout)
    neighbor = qn @ kn.transpose(-1, -2)
    grouped = qg @ kg.transpose(-1, -2)
    dist = (qp[:, :, None] - kp[:, None, :])[:, None]
    scores = torch.where(dist < neighbor_window, neighbor, grouped) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = dist >= 0
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v
