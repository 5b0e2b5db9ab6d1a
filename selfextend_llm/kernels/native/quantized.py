"""A few fp32 rows times a weight kept in GGUF blocks, on the C kernels of ``quantized.c``.

:func:`selfextend_llm.kernels.quantized.quantized_linear` calls this first for decode-sized
calls; where it returns None (another dtype or device, autograd, a compiled graph, rows that are
not contiguous, no compiler) the Inductor-compiled product runs instead.  Measured on 2 cores,
60 projections of the embedded default (1536x576 and 576x1536, ``Q4_1``), one row: 3.2 ms
against 4.8-5.4 ms for the Inductor kernel called directly (with one code a byte; the 4-bit codes are
now read two a byte, see ``common.h``'s ``quant_dot_q4``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import library

if TYPE_CHECKING:
    from ..quantized import QuantizedWeight

#: Weights per block of every format the kernels read.
BLOCK = 32
#: Rows the kernel takes in one call: four at a time in registers, each output's codes read once for all of them.
MAX_ROWS = 32
#: Output features per task.
CHUNK = 64


def weight_problem(weight: QuantizedWeight) -> str | None:
    """Why the C kernels cannot read this weight's blocks (None: they can); ``step.c`` reads the same layout."""
    codes, scale, offset = weight.codes, weight.scale, weight.offset
    layout = {torch.uint8: BLOCK // 2, torch.int8: BLOCK}  # 4-bit codes two a byte, 8-bit codes one a byte
    if codes.dim() != 3 or layout.get(codes.dtype) != codes.shape[-1]:
        return f"block format {weight.format} is not one the kernels read"
    if scale.dtype != torch.float32 or (offset is not None and offset.dtype != torch.float32):
        return "quantised scales not fp32"
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in (codes, scale, offset) if t is not None):
        return "quantised weight not contiguous on the CPU"
    return None


def product(rows: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor | None:
    """``rows @ W.T`` for ``rows`` (``r, in_features``, r <= :data:`MAX_ROWS`): ``(r, out_features)``, or None."""
    lib = library()
    if (
        lib is None
        or not 0 < rows.shape[0] <= MAX_ROWS
        or rows.dtype != torch.float32
        or rows.device.type != "cpu"
        or not rows.is_contiguous()
        or weight_problem(weight) is not None
        or (torch.is_grad_enabled() and rows.requires_grad)
        or torch.compiler.is_compiling()
    ):
        return None
    codes, scale, offset = weight.codes, weight.scale, weight.offset
    out_features, blocks = codes.shape[:2]
    if rows.shape[1] != blocks * BLOCK:
        return None
    out = torch.empty(rows.shape[0], out_features, device="cpu")
    kernel = lib.se_product_q4 if codes.dtype == torch.uint8 else lib.se_product_i8
    status = kernel(
        rows.shape[0], out_features, blocks, codes.data_ptr(), scale.data_ptr(),
        None if offset is None else offset.data_ptr(), rows.data_ptr(), out.data_ptr(), CHUNK,
        torch.get_num_threads(),
    )  # fmt: skip
    return out if status == 0 else None  # -1: no memory for the block sums; the caller's own path runs
