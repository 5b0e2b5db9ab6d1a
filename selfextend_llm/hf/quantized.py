"""Put a GGUF file's quantised weights back into a loaded transformers model (CPU, fp32).

The loader dequantises a GGUF file into a transformers folder, so the model runs anywhere.  On
the CPU that costs decode speed: fp32 weights are 4-8x the bytes of the file's blocks, and a
decode step reads every weight (see :mod:`selfextend_llm.kernels.quantized`).  :func:`attach`
swaps each ``nn.Linear`` whose GGUF tensor is in a simple block format for a
:class:`~selfextend_llm.kernels.quantized.QuantizedLinear` over the file's own blocks.

Nothing is trusted by name alone: a layer is swapped only when its blocks dequantise to exactly
the weight the model holds (for llama-style files, whose q and k rows llama.cpp permuted, the
row order that matches is found), so a wrong mapping can leave a layer fp32 but never change it.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..kernels import quantized as q

#: llama.cpp tensor names inside ``blk.N`` -> the module inside transformers' ``layers[N]``.
LAYER_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass
class Attached:
    """What :func:`attach` did: layers swapped, their formats, bytes before and after."""

    swapped: dict[str, str] = field(default_factory=dict)  # module name -> block format
    kept: dict[str, str] = field(default_factory=dict)  # module name -> why it stayed fp32
    fp32_bytes: int = 0
    quantized_bytes: int = 0
    notes: list[str] = field(default_factory=list)  # what works, but slower than it could

    def describe(self) -> dict[str, Any]:
        return {
            "quantized_layers": len(self.swapped),
            "formats": dict(Counter(self.swapped.values())),
            "fp32_layers_kept": len(self.kept),
            "weight_mb": {"fp32": round(self.fp32_bytes / 2**20, 1), "kept": round(self.quantized_bytes / 2**20, 1)},
            **({"notes": self.notes} if self.notes else {}),
        }


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def _targets(model: torch.nn.Module, tensor_name: str) -> list[tuple[str, torch.nn.Module, str]]:
    """(qualified name, parent module, attribute) of the linear layers a GGUF tensor feeds."""
    parts = tensor_name.split(".")
    if parts[-1] != "weight":
        return []
    found: list[tuple[str, torch.nn.Module, str]] = []
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_MODULES:
        layers = _layers(model)
        index = int(parts[1])
        if layers is None or index >= len(layers):
            return []
        path = LAYER_MODULES[parts[2]].split(".")
        parent = layers[index]
        for step in path[:-1]:
            parent = getattr(parent, step, None)
            if parent is None:
                return []
        found.append((f"layers.{index}.{LAYER_MODULES[parts[2]]}", parent, path[-1]))
    elif tensor_name in ("output.weight", "token_embd.weight"):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        tied = head is not None and embed is not None and getattr(head, "weight", None) is embed.weight
        if head is not None and (tensor_name == "output.weight" or tied):
            for name, module in model.named_modules():
                for attr, child in module.named_children():
                    if child is head:
                        found.append((f"{name}.{attr}".lstrip("."), module, attr))
    return found


def _row_orders(rows: int, config) -> list[np.ndarray | None]:
    """Row orders to try: as stored, then llama.cpp's q/k permutation undone for each head count."""
    orders: list[np.ndarray | None] = [None]
    for heads in {getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)}:
        if isinstance(heads, int) and heads > 0 and rows % (2 * heads) == 0:
            dim = rows // heads // 2
            orders.append(np.arange(rows).reshape(heads, dim, 2).swapaxes(2, 1).reshape(rows))
    return orders


def _matching(raw: np.ndarray, fmt: str, weight: torch.Tensor, config) -> q.QuantizedWeight | None:
    for order in _row_orders(raw.shape[0], config):
        blocks = raw if order is None else raw[order]
        packed = q.unpack(blocks, fmt)
        if packed.shape == tuple(weight.shape) and torch.equal(q.dequantize(packed), weight):
            return packed
    return None


def _from_gguf(model: torch.nn.Module, gguf_path: Path, result: Attached) -> dict[str, q.QuantizedWeight]:
    """Each matching layer's blocks, read from the file and checked against the layer's fp32 weight."""
    from gguf import GGUFReader

    found: dict[str, q.QuantizedWeight] = {}
    config = getattr(model, "config", None)
    for tensor in GGUFReader(str(gguf_path)).tensors:
        fmt = tensor.tensor_type.name
        for name, parent, attr in _targets(model, tensor.name):
            linear = getattr(parent, attr)
            if not isinstance(linear, torch.nn.Linear):
                result.kept[name] = f"not an nn.Linear ({type(linear).__name__})"
            elif fmt not in q.FORMATS:
                result.kept[name] = f"block format {fmt} is kept as fp32"
            else:
                packed = _matching(np.asarray(tensor.data), fmt, linear.weight.detach(), config)
                if packed is None:
                    result.kept[name] = f"{tensor.name} does not dequantise to this layer's weight"
                else:
                    found[name] = packed
    return found


def _save(path: Path, found: dict[str, q.QuantizedWeight]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, w in found.items():
        tensors[f"{name}.codes"], tensors[f"{name}.scale"] = w.codes, w.scale
        if w.offset is not None:
            tensors[f"{name}.offset"] = w.offset
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={name: w.format for name, w in found.items()})
    os.replace(tmp, path)  # atomic: a concurrent loader sees the whole file or none


def _load(path: Path) -> dict[str, q.QuantizedWeight]:
    from safetensors import safe_open

    found: dict[str, q.QuantizedWeight] = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for name, fmt in (f.metadata() or {}).items():
            offset = f.get_tensor(f"{name}.offset") if f"{name}.offset" in keys else None
            codes = q.pack_nibbles(f.get_tensor(f"{name}.codes"), fmt)  # a file written with one code a byte
            found[name] = q.QuantizedWeight(codes, f.get_tensor(f"{name}.scale"), offset, fmt)
    return found


def _spot_check(packed: q.QuantizedWeight, weight: torch.Tensor) -> bool:
    """The first and last rows dequantise to the layer's weight (a cached file is checked this cheaply)."""
    if packed.shape != tuple(weight.shape):
        return False
    rows = [0, weight.shape[0] - 1]
    offset = None if packed.offset is None else packed.offset[rows]
    return torch.equal(q._dequantize(packed.codes[rows], packed.scale[rows], offset), weight[rows])


def attach(model: torch.nn.Module, gguf_path: str | Path, cache: str | Path | None = None) -> Attached:
    """Swap the model's fp32 linear layers for the GGUF file's quantised blocks where they match.

    The model must be on the CPU in fp32 (the dequantised weights it was loaded with are what each
    layer is checked against).  ``cache``: a file to keep the unpacked blocks in (written on the
    first load; later loads skip parsing the GGUF file, ~5 s for the default's vocabulary).
    Returns what was swapped and what stayed fp32, with the reason.
    """
    first = next(model.parameters())
    if first.device.type != "cpu" or first.dtype != torch.float32:
        raise ValueError(
            f"quantised weights run on the CPU in float32; this model is {first.dtype} on {first.device}. "
            "Load it with device='cpu', dtype='float32', or pass quantized_weights=False"
        )
    result = Attached()
    why = q.kernels_available()
    if why is not None:
        warnings.warn(
            f"quantised weights are off: the compiled CPU kernels do not run here ({why}); the model keeps its fp32 "
            "weights (same tokens, slower decoding). Install a C++ compiler for torch.compile, or pass "
            "quantized_weights=False to skip the attempt",
            RuntimeWarning,
            stacklevel=2,
        )
        result.kept["*"] = f"the compiled kernels do not run here ({why})"
        return result
    cache = None if cache is None else Path(cache)
    found = None
    if cache is not None and cache.is_file():
        try:
            found = _load(cache)
        except Exception as err:  # cut short (a killed write of an older version, a full disk): rebuild it
            warnings.warn(
                f"the cached quantised blocks {cache} could not be read ({type(err).__name__}: {err}); rebuilding "
                "them from the GGUF file",
                RuntimeWarning,
                stacklevel=2,
            )
            cache.unlink(missing_ok=True)
    modules = {name: (parent, attr) for name, parent, attr in _all_targets(model)}
    if found is not None and not all(
        name in modules and _spot_check(w, getattr(*modules[name]).weight.detach()) for name, w in found.items()
    ):
        found = None  # stale or foreign file: read the GGUF again
    if found is None:
        found = _from_gguf(model, Path(gguf_path), result)
        if cache is not None and found:
            cache.parent.mkdir(parents=True, exist_ok=True)
            from ..loading import remove_stale_temporaries

            remove_stale_temporaries(cache.parent, cache.name)
            _save(cache, found)
    for name, packed in found.items():
        parent, attr = modules[name]
        linear = getattr(parent, attr)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layer = q.QuantizedLinear(packed, bias)
        try:
            layer.prepare()
        except Exception as err:  # noqa: BLE001 - the generic compiled path still works
            note = f"single-row kernel unavailable, generic path used ({type(err).__name__}: {err})"
            if note not in result.notes:
                result.notes.append(note)
        setattr(parent, attr, layer)
        result.swapped[name] = packed.format
        result.fp32_bytes += linear.weight.numel() * 4
        result.quantized_bytes += packed.nbytes()
    return result


def _all_targets(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """Every linear layer a llama.cpp tensor name can feed, by the names :func:`_targets` gives."""
    out = []
    layers = _layers(model)
    for index in range(len(layers) if layers is not None else 0):
        for short in LAYER_MODULES:
            out += _targets(model, f"blk.{index}.{short}.weight")
    seen = {name for name, _, _ in out}
    for tensor_name in ("output.weight", "token_embd.weight"):
        out += [t for t in _targets(model, tensor_name) if t[0] not in seen]
        seen = {name for name, _, _ in out}
    return out
