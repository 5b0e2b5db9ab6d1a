"""Whole decoder layers for one CPU decode step on ``step.c``: the descriptors it reads, and the call.

This module knows tensors, not transformers: :mod:`selfextend_llm.hf.native_step` finds a
model's weights and caches and calls :func:`run`.  A descriptor holds raw pointers, so a
:class:`Layers` keeps every tensor it points at alive, and the caller rebuilds it whenever a
weight or cache tensor changes (:meth:`Layers.points_at`).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from ..quantized import BLOCK, QuantizedWeight
from . import library
from .quantized import weight_problem as quantized_weight_problem

_I64, _INT, _PTR, _FLOAT = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float

#: Weight kinds of ``step.c``'s ``SeLinear``: fp32, 4-bit codes two a byte (uint8), 8-bit codes (int8).
KINDS = {torch.float32: 0, torch.uint8: 1, torch.int8: 2}
#: Keys per attention task (the scratch for partial sums is sized by it).
KEY_CHUNK = 256
#: Rows (sequences) one call takes.
MAX_BATCH = 4
#: Blocks per input row a quantised projection may have (``common.h``'s ``SE_MAX_BLOCKS``: block sums on the stack).
MAX_BLOCKS = 1024
#: Largest head dim (a head is rotated on the stack).
MAX_HEAD_DIM = 512
#: ``se_decode_layers`` return codes.
ERRORS = {-1: "scratch too small", -2: "a cache layer's length is not the step's slot", -3: "unsupported shape"}


class Linear(ctypes.Structure):
    _fields_ = [
        ("kind", _I64),
        ("out_features", _I64),
        ("in_features", _I64),
        ("weight", _PTR),
        ("scale", _PTR),
        ("offset", _PTR),
        ("bias", _PTR),
    ]


PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


class Layer(ctypes.Structure):
    _fields_ = [
        ("attn_norm", _PTR),
        ("mlp_norm", _PTR),
        *[(name, Linear) for name in PROJECTIONS],
        ("key", _PTR),
        ("value", _PTR),
        ("grouped", _PTR),
        ("length", _PTR),
    ]


class Step(ctypes.Structure):
    _fields_ = [
        *[(name, _I64) for name in ("batch", "heads", "kv_heads", "dim", "hidden", "intermediate")],
        *[(name, _I64) for name in ("capacity", "slot", "boundary")],
        ("eps", _FLOAT),
        ("scale", _FLOAT),
        *[(name, _PTR) for name in ("cos", "sin", "q_cos", "q_sin", "k_cos", "k_sin", "q_factor", "key_valid")],
        ("scratch", _PTR),
        ("scratch_floats", _I64),
        ("chunk", _I64),
        ("threads", _INT),
    ]


Weight = torch.Tensor | QuantizedWeight


@dataclass
class LayerWeights:
    """One decoder layer's parameters: two RMSNorm weights, seven projections (weight, bias or None)."""

    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    projections: dict[str, tuple[Weight, torch.Tensor | None]]


def _fp32_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def linear_problem(weight: Weight, bias: torch.Tensor | None) -> str | None:
    """Why ``step.c`` cannot take this projection (None: it can)."""
    if bias is not None and not _fp32_cpu(bias):
        return "bias not fp32 contiguous on the CPU"
    if isinstance(weight, QuantizedWeight):
        problem = quantized_weight_problem(weight)
        if problem is None and weight.codes.shape[1] > MAX_BLOCKS:
            return f"more than {MAX_BLOCKS * BLOCK:,} input features"
        return problem
    if weight.dim() != 2 or not _fp32_cpu(weight):
        return f"weight is {weight.dtype} on {weight.device}, not fp32 contiguous on the CPU"
    return None


def _linear(weight: Weight, bias: torch.Tensor | None) -> Linear:
    bias_ptr = None if bias is None else bias.data_ptr()
    if isinstance(weight, QuantizedWeight):
        out, inp = weight.shape
        offset = None if weight.offset is None else weight.offset.data_ptr()
        return Linear(
            KINDS[weight.codes.dtype], out, inp, weight.codes.data_ptr(), weight.scale.data_ptr(), offset, bias_ptr
        )
    return Linear(KINDS[torch.float32], weight.shape[0], weight.shape[1], weight.data_ptr(), None, None, bias_ptr)


def tensors_of(weight: Weight) -> list[torch.Tensor]:
    """The tensors a projection's descriptor points at."""
    if isinstance(weight, QuantizedWeight):
        return [t for t in (weight.codes, weight.scale, weight.offset) if t is not None]
    return [weight]


def held_tensors(
    weights: list[LayerWeights],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    grouped: list[torch.Tensor | None],
    lengths: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Every tensor a :class:`Layers` over these arguments points at, in the order :meth:`Layers.points_at` checks."""
    held: list[torch.Tensor] = []
    for i, w in enumerate(weights):
        for name in PROJECTIONS:
            weight, bias = w.projections[name]
            held += tensors_of(weight) + ([] if bias is None else [bias])
        held += [w.attn_norm, w.mlp_norm, keys[i], values[i], lengths[i]]
        held += [] if grouped[i] is None else [grouped[i]]
    return held


class Layers:
    """The ``SeLayer`` array of one model over one static cache (and its grouped-key mirrors)."""

    def __init__(
        self,
        weights: list[LayerWeights],
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        grouped: list[torch.Tensor | None],
        lengths: list[torch.Tensor],
    ):
        self.count = len(weights)
        self.array = (Layer * self.count)()
        for i, w in enumerate(weights):
            layer = self.array[i]
            layer.attn_norm, layer.mlp_norm = w.attn_norm.data_ptr(), w.mlp_norm.data_ptr()
            for name in PROJECTIONS:
                setattr(layer, name, _linear(*w.projections[name]))
            layer.key, layer.value = keys[i].data_ptr(), values[i].data_ptr()
            layer.grouped = None if grouped[i] is None else grouped[i].data_ptr()
            layer.length = lengths[i].data_ptr()
        # every tensor a pointer above refers to stays alive with this object
        self._held = held_tensors(weights, keys, values, grouped, lengths)

    def points_at(self, tensors: list[torch.Tensor]) -> bool:
        """Whether this array was built over exactly these tensors (:func:`held_tensors`' order)."""
        return len(tensors) == len(self._held) and all(a is b for a, b in zip(tensors, self._held, strict=True))


def scratch_floats(
    batch: int, heads: int, kv_heads: int, dim: int, hidden: int, intermediate: int, capacity: int
) -> int:
    """Floats of scratch one call needs (asked of ``step.c``, which lays the scratch out)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the C kernels are not built here")
    return lib.se_step_scratch(batch, heads, kv_heads, dim, hidden, intermediate, capacity, KEY_CHUNK)


def run(
    layers: Layers,
    x: torch.Tensor,
    *,
    heads: int,
    kv_heads: int,
    intermediate: int,
    capacity: int,
    slot: int,
    boundary: int,
    eps: float,
    scale: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    query_turn: tuple[torch.Tensor, torch.Tensor] | None,
    key_turn: tuple[torch.Tensor, torch.Tensor] | None,
    query_factor: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    scratch: torch.Tensor,
) -> int:
    """Run every layer on ``x`` (``batch, hidden``, fp32, contiguous) in place; returns ``step.c``'s code.

    ``cos``/``sin`` (``batch, dim``) are the model's RoPE tables at each row's position;
    ``query_turn``/``key_turn`` (cos, sin of ``batch, dim / 2``) turn the query and the new key to
    their grouped positions on grouped layers (None: no layer is grouped); ``query_factor``
    (``batch``) is the log scaling of grouped layers' queries; ``key_valid`` (``batch, slot + 1``,
    uint8) marks real keys (None: no padding).  Keys before ``boundary`` are seen grouped.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the C kernels are not built here")
    batch, hidden = x.shape
    dim = cos.shape[-1]
    qc, qs = query_turn if query_turn is not None else (None, None)
    kc, ks = key_turn if key_turn is not None else (None, None)

    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    step = Step(
        batch, heads, kv_heads, dim, hidden, intermediate, capacity, slot, boundary, eps, scale,
        cos.data_ptr(), sin.data_ptr(), ptr(qc), ptr(qs), ptr(kc), ptr(ks), ptr(query_factor), ptr(key_valid),
        scratch.data_ptr(), scratch.numel(), KEY_CHUNK, torch.get_num_threads(),
    )  # fmt: skip
    return lib.se_decode_layers(layers.count, layers.array, ctypes.byref(step), x.data_ptr())
