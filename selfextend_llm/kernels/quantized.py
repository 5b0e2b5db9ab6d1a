"""Linear layers that keep a GGUF file's quantised weights: the CPU decode step reads 4-8 bits a weight.

Why: on the CPU a decode step is bound by memory, not arithmetic.  The embedded default's fp32
weights are 540 MB, and every generated token reads all of them (the lm head alone 113 MB).  The
GGUF file stores the same weights as 4-bit (``Q4_0``/``Q4_1``) or 8-bit (``Q8_0``) blocks of 32
with one fp16 scale (and, for ``Q4_1``, one fp16 minimum) per block, so the dequantised fp32
weights hold exactly those values.  Kept in that form (4-bit codes two a byte as in the file, 8-bit
codes one a byte, the scales in fp32), the same step reads under a fifth of the bytes.

Two paths, chosen by the number of rows (tokens) in the call:

* up to :data:`PRODUCT_ROWS` rows (decode): one compiled kernel multiplies each block by the input
  and applies the scale and minimum per block, without materialising the fp32 weight; the result
  differs from ``x @ W.T`` only in summation order (~1e-6 relative);
* a batched decode step (up to :data:`CHUNKED_ROWS` rows of one token each): the C product, every row
  in one call (four at a time in registers);
* more rows (prefill): the weight is dequantised by a compiled elementwise kernel (bit-identical to
  the dequantisation the loader did) and multiplied by ``F.linear``: the same numbers as the fp32
  model, and for long prompts the dequantisation is <1% of the call.

Both kernels are ``torch.compile``d once with dynamic shapes (every matrix shape shares them);
single-row calls, the common case in decoding, use :func:`one_row_kernel` instead: the same
product compiled by Inductor per shape and called without ``torch.compile``'s guards.  Where the
C kernels build (:mod:`.native.quantized`, the usual case) they take every decode-sized fp32 call
first, at about 1.5x the Inductor kernel's speed, and no per-shape kernel is compiled.
:func:`kernels_available` tries the compiled kernels on tiny inputs first; where the compiler does
not work the caller keeps the fp32 weights.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import native
from .native import quantized as native_quantized

#: Weights per block in every supported format.
BLOCK = 32
#: Calls with at most this many rows use the fused product; more rows dequantise and call
#: ``F.linear`` (measured on 2 CPU cores, 1536x576: the product wins to 4 rows, loses from 8).
PRODUCT_ROWS = 4
#: Up to this many rows of one token each the C product runs them in one call, where it builds: a batched
#: decode step
#: (the continuous batcher's 8-32 rows) then reads the 4-bit codes a few times instead of writing and
#: reading a dequantised fp32 copy of every weight.  All 211 layers of the default on 2 cores, 16 rows:
#: 89 ms against 180 ms dequantised; 32 rows: 163 against 190 (``benchmarks/server_load.py`` notes).
CHUNKED_ROWS = 32


@dataclass(frozen=True)
class BlockFormat:
    """One GGUF block format: bytes a block, and whether it stores a minimum (offset) per block."""

    name: str
    block_bytes: int
    has_min: bool
    signed: bool


#: The formats kept quantised (the simple 32-weight blocks); others (K-quants, ...) stay fp32.
FORMATS: dict[str, BlockFormat] = {
    "Q4_0": BlockFormat("Q4_0", 2 + 16, has_min=False, signed=False),
    "Q4_1": BlockFormat("Q4_1", 2 + 2 + 16, has_min=True, signed=False),
    "Q8_0": BlockFormat("Q8_0", 2 + 32, has_min=False, signed=True),
}


@dataclass
class QuantizedWeight:
    """A weight matrix as integer codes and per-block scales: ``W = q * scale + offset``.

    ``codes``: ``(out, blocks, 16)`` uint8 for the 4-bit formats, two codes a byte as GGUF stores them
    (byte ``i`` holds weight ``i`` in its low nibble and weight ``i + 16`` in its high one; ``Q4_1``:
    ``q`` is the nibble, ``Q4_0``: the nibble minus 8), or ``(out, blocks, 32)`` int8 (``Q8_0``: ``q`` is
    the code).  ``scale``, ``offset``: ``(out, blocks)`` fp32; ``offset`` is None when the format has none
    (which, for 4-bit codes, is what marks ``Q4_0``).  Why two a byte: a decode step is bound by
    reading the codes, and half the bytes is the larger part of its time (:mod:`.native`).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    format: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * BLOCK

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset) if t is not None)


def unpack(raw: np.ndarray, fmt: str) -> QuantizedWeight:
    """Codes and scales from a GGUF tensor's raw bytes, ``(out, blocks * block_bytes)`` uint8.

    Follows the GGML layouts (as ``gguf.quants`` dequantises them): ``Q4_0`` is ``d`` then 16
    bytes of nibbles, weights 0-15 in the low nibbles and 16-31 in the high ones, value
    ``d * (q - 8)``; ``Q4_1`` is ``d, m`` then the nibbles, value ``d * q + m``; ``Q8_0`` is ``d``
    then 32 int8 codes, value ``d * q``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"block format {fmt!r} is not kept quantised; supported: {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    raw = np.array(raw, dtype=np.uint8)  # a copy: GGUF tensors are read-only memory maps
    if raw.ndim != 2 or raw.shape[1] % spec.block_bytes:
        raise ValueError(f"{fmt} data must be (rows, blocks * {spec.block_bytes}) bytes, got shape {raw.shape}")
    rows, blocks = raw.shape[0], raw.shape[1] // spec.block_bytes
    data = torch.from_numpy(raw).view(rows, blocks, spec.block_bytes)
    scale = data[..., 0:2].contiguous().view(torch.float16).to(torch.float32)[..., 0]
    offset = None
    start = 2
    if spec.has_min:
        offset = data[..., 2:4].contiguous().view(torch.float16).to(torch.float32)[..., 0]
        start = 4
    body = data[..., start:]
    if spec.signed:
        codes = body.contiguous().view(torch.int8)
    else:  # the file's nibbles as they are; Q4_0's value d * (q - 8) is marked by having no offset
        codes = body.contiguous()
    return QuantizedWeight(codes.contiguous(), scale.contiguous(), offset, fmt)


def pack_nibbles(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """4-bit codes one a byte (``(out, blocks, 32)``: the layout this package cached before) two a byte.

    ``Q4_0`` codes were stored as ``q - 8`` (int8); others as ``q``.  Other formats come back unchanged.
    """
    if fmt not in ("Q4_0", "Q4_1") or codes.shape[-1] != BLOCK:
        return codes
    q = codes.to(torch.int16) + (8 if fmt == "Q4_0" else 0)
    return (q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)).to(torch.uint8).contiguous()


# Three variants of each kernel (Q4_1: nibbles and an offset per block; Q4_0: nibbles less 8; Q8_0: int8 codes), as
# separate functions so that each has its own compiled-graph cache (the compiler allows 8 variants a function).


def _values(codes: torch.Tensor, less: float = 0.0) -> torch.Tensor:
    """4-bit codes two a byte as fp32 values ``q`` in weight order, ``(out, blocks, 32)``."""
    return torch.cat([codes & 0x0F, codes >> 4], dim=-1).to(torch.float32) - less  # exact: small integers


def _dequantize_affine(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    # The loader's arithmetic (gguf.quants: float(q) * d, then + m): same rounding, same fp32 values.
    return (_values(codes) * scale[..., None] + offset[..., None]).reshape(codes.shape[0], -1)


def _dequantize_nibbles(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (_values(codes, 8.0) * scale[..., None]).reshape(codes.shape[0], -1)


def _dequantize_scaled(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (codes.to(torch.float32) * scale[..., None]).reshape(codes.shape[0], -1)


def _product_affine(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    # y[r, n] = sum_b scale[n, b] * (q[n, b, :] . x[r, b, :]) + offset[n, b] * sum(x[r, b, :])
    xb = x.reshape(x.shape[0], 1, -1, BLOCK)
    return ((_values(codes).unsqueeze(0) * xb).sum(-1) * scale).sum(-1) + (offset * xb.sum(-1)).sum(-1)


def _product_nibbles(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xb = x.reshape(x.shape[0], 1, -1, BLOCK)
    return ((_values(codes, 8.0).unsqueeze(0) * xb).sum(-1) * scale).sum(-1)


def _product_scaled(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xb = x.reshape(x.shape[0], 1, -1, BLOCK)
    return ((codes.unsqueeze(0).to(x.dtype) * xb).sum(-1) * scale).sum(-1)


def variant(codes: torch.Tensor, offset: torch.Tensor | None) -> str:
    """Which of the kernels above reads these blocks: ``affine`` (Q4_1), ``nibbles`` (Q4_0), ``scaled`` (Q8_0)."""
    if offset is not None:
        return "affine"
    return "nibbles" if codes.shape[-1] == BLOCK // 2 else "scaled"


def _arguments(weight: QuantizedWeight) -> tuple[torch.Tensor, ...]:
    return (weight.codes, weight.scale) + (() if weight.offset is None else (weight.offset,))


@functools.cache
def _compiled(name: str):
    return torch.compile(globals()[name], dynamic=True, fullgraph=True)


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """Eager dequantisation (tests, spot checks): the same values as :func:`dequantize`."""
    args = (codes, scale) + (() if offset is None else (offset,))
    return globals()[f"_dequantize_{variant(codes, offset)}"](*args)


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The fp32 matrix ``(out, in)``, equal bit for bit to the loader's dequantisation."""
    return _compiled(f"_dequantize_{variant(weight.codes, weight.offset)}")(*_arguments(weight))


_ONE_ROW: dict[tuple, Callable[..., torch.Tensor]] = {}
_ONE_ROW_LOCK = threading.Lock()


def one_row_kernel(weight: QuantizedWeight) -> Callable[..., torch.Tensor]:
    """The product for exactly one fp32 row, compiled by Inductor for this weight's shape (kept per shape).

    Why a second compiled form: a decode step calls ~200 linear layers, and the ``torch.compile``
    wrapper costs ~40-55 us a call in guards and wrappers (measured: 38 us against 11 us for the same
    Inductor code called directly), a fifth of a 2k-token step on 2 cores.  The direct form has no
    guards, so :func:`quantized_linear` calls it only for what it was compiled for: one contiguous
    fp32 row of the right width, and this shape, dtype and offset layout (the key below).
    """
    key = (weight.codes.shape[0], weight.codes.shape[1], variant(weight.codes, weight.offset))
    with _ONE_ROW_LOCK:
        fn = _ONE_ROW.get(key)
        if fn is None:
            from torch._inductor import compile as inductor_compile
            from torch.fx.experimental.proxy_tensor import make_fx

            args = [torch.zeros(1, key[1] * BLOCK, device="cpu"), *_arguments(weight)]
            target = globals()[f"_product_{variant(weight.codes, weight.offset)}"]
            with torch.no_grad():
                fn = inductor_compile(make_fx(target)(*args), args)
            _ONE_ROW[key] = fn
    return fn


def quantized_linear(
    x: torch.Tensor,
    weight: QuantizedWeight,
    bias: torch.Tensor | None = None,
    one_row: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for ``W`` kept quantised (see the module docstring for the two paths).

    ``one_row``: :func:`one_row_kernel` of this weight, used for single-row fp32 calls (decode).
    """
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if rows.shape[0] <= PRODUCT_ROWS:
        if rows.storage_offset() or not rows.is_contiguous():
            rows = rows.clone(memory_format=torch.contiguous_format)  # one graph for every view (a few KB)
        native_out = native_quantized.product(rows, weight)
        if native_out is not None:
            out = native_out
        elif (
            one_row is not None
            and rows.shape == (1, weight.codes.shape[1] * BLOCK)
            and rows.dtype == torch.float32
            and rows.device.type == "cpu"
        ):  # exactly what the unguarded kernel was compiled for
            out = one_row(rows, *_arguments(weight))
        else:
            out = _compiled(f"_product_{variant(weight.codes, weight.offset)}")(rows, *_arguments(weight))
        if bias is not None:
            out = out + bias
    else:
        # one token a row (a batched decode step, x: (batch, 1, in)): the C product; a prompt's tokens keep
        # the fp32 model's own numbers (greedy answers stay token for token what they were)
        decode = x.dim() == 3 and shape[1] == 1 and rows.shape[0] <= CHUNKED_ROWS
        out = _chunked_product(rows, weight) if decode else None
        if out is None:
            out = F.linear(rows, dequantize(weight), bias)
        elif bias is not None:
            out = out + bias
    return out.reshape(*shape[:-1], out.shape[-1])


def _chunked_product(rows: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor | None:
    """The C product over every row in one call (None where it does not run: the caller dequantises).  The
    kernel takes the rows four at a time with each output's codes still in L1, bit for bit the same as four
    rows a call (``quantized.c``)."""
    if rows.storage_offset() or not rows.is_contiguous():
        rows = rows.clone(memory_format=torch.contiguous_format)
    return native_quantized.product(rows, weight)


class QuantizedLinear(torch.nn.Module):
    """A bias-optional linear layer over a :class:`QuantizedWeight` (buffers, so ``.to()`` moves them).

    It stands in for ``nn.Linear`` in an fp32 model on the CPU.  ``weight`` is not stored:
    :meth:`dequantized` rebuilds it (the fp32 values the model was loaded with).
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.format = weight.format
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("offset", weight.offset)
        self.register_buffer("bias", bias)
        #: :func:`one_row_kernel` for this shape, set by :meth:`prepare` (None: the generic path).
        self.one_row: Callable[..., torch.Tensor] | None = None

    def prepare(self) -> None:
        """Compile (or reuse) the single-row kernel for this layer's shape, before any generation.

        Not needed where the C kernels run (:mod:`.native.quantized` takes those calls first).
        """
        if native.library() is None and all(
            t is None or t.is_contiguous() for t in (self.codes, self.scale, self.offset)
        ):
            self.one_row = one_row_kernel(self._weight())

    def _apply(self, fn, recurse=True):
        self.one_row = None  # moved or cast buffers: the compiled kernel's assumptions no longer hold
        return super()._apply(fn, recurse)

    def _weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scale, self.offset, self.format)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self._weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self._weight(), self.bias, self.one_row)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


def kernels_available() -> str | None:
    """None if the compiled kernels run here, else why not.

    Compiles every variant a model uses (with and without offsets; one row, a few rows, many rows)
    on tiny inputs, so that no compilation happens later inside a generation (or a server thread).
    Sizes 0 and 1 are specialised by the compiler, so the warm-up shapes avoid them.
    """
    nibbles = torch.zeros(3, 2, BLOCK // 2, dtype=torch.uint8, device="cpu")
    weights = [
        QuantizedWeight(nibbles, torch.ones(3, 2, device="cpu"), torch.zeros(3, 2, device="cpu"), "warm-up"),
        QuantizedWeight(nibbles, torch.ones(3, 2, device="cpu"), None, "warm-up"),
        QuantizedWeight(
            torch.zeros(3, 2, BLOCK, dtype=torch.int8, device="cpu"), torch.ones(3, 2, device="cpu"), None, "warm-up"
        ),
    ]
    rows_to_warm = (PRODUCT_ROWS + 1,) if native.library() else (1, 2, PRODUCT_ROWS + 1)  # C takes <= 4 rows
    try:
        # generate() runs under inference mode, evaluation under no_grad: the compiler keeps a graph
        # for each (the weights are ordinary tensors, the inputs are made inside the mode).
        for mode in (torch.inference_mode, torch.no_grad):
            with mode():
                for w in weights:
                    for rows in rows_to_warm:
                        quantized_linear(torch.ones(rows, 2 * BLOCK, device="cpu"), w)
    except Exception as err:  # noqa: BLE001 - any compiler failure means "keep fp32"
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None
