"""SelfExtend's GPU kernels in Triton: one file per kernel, shared pieces in :mod:`.utils`.

* :mod:`.prefill`: the one-pass prefill (chunks, padded batches, float32): both score kinds in
  one online softmax, queries rotated to grouped positions in registers;
* :mod:`.split_prefill`: a whole prefill, its grouped part on the fused kernel plain SDPA uses and
  the neighbor band in Triton;
* :mod:`.decode`: split-K ("flash-decoding") for one query per sequence, grouped keys rotated in
  registers, so no grouped copy of the cache is kept;
* :mod:`.rotate`: re-rotation of cached rows to grouped positions.

This module answers "can they run here" without importing Triton's compiler: :func:`available`,
:func:`supports`, :func:`disable` (shapes whose launch ran out of resources take the other paths
from then on) and :class:`OutOfResources`.  The kernels are imported only where Triton is.

Supported: the "half" RoPE layout with rotary dim == head dim, head dims that are powers of two,
no logit softcapping, no extra mask beyond key padding.  Anything else takes the flex/SDPA paths.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU builds lack it.
    import triton  # noqa: F401  (absolute: the Triton package, not this one)
    from triton.runtime.errors import OutOfResources

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    HAS_TRITON = False

    class OutOfResources(RuntimeError):  # type: ignore[no-redef]
        """Stand-in so that callers can name the exception without Triton installed."""


#: (head_dim, dtype) pairs whose kernels did not fit the GPU; they take the other paths from then on.
DISABLED: set[tuple[int, torch.dtype]] = set()


def disable(head_dim: int, dtype: torch.dtype) -> None:
    """Stop using the kernels for this shape (after a launch ran out of shared memory or registers)."""
    DISABLED.add((head_dim, dtype))


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests on machines without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreted())


def supports(head_dim: int, rotary_dim: int, layout: str, dtype: torch.dtype) -> bool:
    """Shapes and layouts the kernels handle; the caller falls back to the other paths otherwise."""
    return (
        layout == "half"
        and (head_dim, dtype) not in DISABLED
        and rotary_dim == head_dim
        and head_dim in (32, 64, 128, 256)
        and dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


if HAS_TRITON:
    from .decode import decode
    from .prefill import prefill
    from .rotate import rotate_keys_to_groups, rotate_to_groups
    from .split_prefill import prefill_split
else:  # pragma: no cover - CPU-only installs; callers check available() first

    def _needs_triton(*args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "SelfExtend's Triton kernels need Triton: install a CUDA build of PyTorch (it ships Triton) or "
            "pip install triton; use backend='auto' to take the other paths"
        )

    decode = prefill = prefill_split = rotate_to_groups = rotate_keys_to_groups = _needs_triton

__all__ = [
    "HAS_TRITON",
    "OutOfResources",
    "available",
    "decode",
    "disable",
    "interpreted",
    "prefill",
    "prefill_split",
    "rotate_keys_to_groups",
    "rotate_to_groups",
    "supports",
]
