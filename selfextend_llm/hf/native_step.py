"""CPU decode steps of Llama-style models in one C call (``kernels/native/step.c``), SelfExtend included.

Why: after the C attention and product kernels (:mod:`..kernels.native`), a CPU decode step of
the embedded default at 2k tokens was ~40 ms, of which the kernels were ~10: the rest was
transformers' eager Python: ~400 module calls and ~4,800 tensor operations a token (views included).  On a
static cache nothing about a decode step needs Python: :class:`NativeDecoder` wraps the decoder's
``forward`` and, for a step it can take, runs every layer in ``step.c`` (the same arithmetic,
only sums reassociated), then the model's own final norm.  The lm head, sampling, stopping and
streaming stay transformers' ``generate``.

A step runs natively only when everything is as ``step.c`` implements it, checked per call;
anything else is the model's own forward, which is always correct:

* the model: Llama, Mistral or Qwen2 layers (RMSNorm, SiLU MLP, RoPE in the "half" layout over the
  whole head), fp32 on the CPU, every projection fp32 or GGUF blocks (:mod:`.quantized`);
* the call: one new token per row for at most :data:`~..kernels.native.step.MAX_BATCH` rows,
  over transformers' ``StaticCache`` (the fast path's), no gradients, no compilation, no
  attentions or hidden states asked for, a 2-D padding mask (or none);
* SelfExtend: off, bypassed, or on the default backend with its grouped-key mirror kept for this
  cache (the eager static path makes it at prefill).

The cache ends each step exactly as the model's forward would leave it (keys, values,
``cumulative_length``, the grouped-key mirror), so native and eager steps can follow each other.
``SELFEXTEND_NATIVE_KERNELS=0`` (or no C compiler) turns this off with the other C kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

import torch
from transformers.cache_utils import StaticCache, StaticLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..kernels import native
from ..kernels.native import step as native_step
from ..kernels.quantized import QuantizedLinear, QuantizedWeight
from ..rope import grouped_key_position, grouped_query_position, log_scale_factor, rotation_tables

#: ``config.model_type`` of the families whose layers ``step.c`` implements.
FAMILIES = ("llama", "mistral", "qwen2")
_CACHE_FIELD = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
)


#: ``(container, key, object)``: the object found under ``container[key]`` when the weights were read.
Check = tuple[dict, str, object]


def _watched(parent: torch.nn.Module, name: str, checks: list[Check]) -> Any:
    """``parent.name`` (a submodule, parameter or buffer), recording where it was found."""
    for container in (parent._modules, parent._parameters, parent._buffers):
        if name in container:
            checks.append((container, name, container[name]))
            return container[name]
    return getattr(parent, name, None)  # not a module attribute (e.g. a float): nothing to watch


def _projection(module: torch.nn.Module, checks: list[Check]) -> tuple[native_step.Weight, torch.Tensor | None] | str:
    if isinstance(module, QuantizedLinear):
        codes, scale, offset = (_watched(module, n, checks) for n in ("codes", "scale", "offset"))
        return QuantizedWeight(codes, scale, offset, module.format), _watched(module, "bias", checks)
    if type(module) is torch.nn.Linear:
        return _watched(module, "weight", checks), _watched(module, "bias", checks)
    return f"{type(module).__name__} is not a linear layer the kernel reads"


def _layer_weights(layer: torch.nn.Module) -> tuple[native_step.LayerWeights, list[Check]] | str:
    """A decoder layer's parameters as ``step.c`` reads them and where they were found, or why it cannot.

    The checks let a step confirm in microseconds that no module or tensor was swapped since
    (``model.to()``, a re-attached weight): reading the weights afresh costs ~0.2 ms a layer.
    """
    checks: list[Check] = []
    attn, mlp = _watched(layer, "self_attn", checks), _watched(layer, "mlp", checks)
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    if attn is None or mlp is None or any(getattr(attn, n, None) is None for n in names.values()):
        return "not a Llama-style decoder layer"
    if any(hasattr(attn, n) for n in ("q_norm", "k_norm", "qkv_proj")):
        return "attention with q/k norms or a fused qkv projection"
    if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation"):
        return f"MLP activation {type(getattr(mlp, 'act_fn', None)).__name__}, not SiLU"
    norms = [_watched(layer, n, checks) for n in ("input_layernorm", "post_attention_layernorm")]
    if any(n is None or not type(n).__name__.endswith("RMSNorm") or not hasattr(n, "variance_epsilon") for n in norms):
        return "not RMSNorm before attention and MLP"
    modules = {k: _watched(attn, v, checks) for k, v in names.items()}
    modules.update({k: _watched(mlp, f"{k}_proj", checks) for k in ("gate", "up", "down")})
    projections = {}
    for name, module in modules.items():
        found = _projection(module, checks)
        if isinstance(found, str):
            return f"{name}: {found}"
        problem = native_step.linear_problem(*found)
        if problem is not None:
            return f"{name}: {problem}"
        projections[name] = found
    norm_weights = [_watched(n, "weight", checks) for n in norms]
    if not all(w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous() for w in norm_weights):
        return "norm weights are not fp32 contiguous on the CPU"
    return native_step.LayerWeights(norm_weights[0], norm_weights[1], projections), checks


def why_not(model: torch.nn.Module) -> str | None:
    """Why ``model``'s architecture cannot run on ``step.c`` (None: it can; its layers' weights are
    checked by :class:`NativeDecoder`, which :func:`install` makes next)."""
    why = native.unavailable()
    if why is not None:
        return why
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FAMILIES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {', '.join(FAMILIES)}"
    decoder = getattr(model, "model", None)
    if decoder is None or not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "no Llama-style decoder (embed_tokens, layers, norm, rotary_emb)"
    if any(t not in (None, "full_attention") for t in getattr(config, "layer_types", None) or ()):
        return "sliding-window layers"
    if getattr(config, "sliding_window", None) and (
        config.model_type == "mistral" or getattr(config, "use_sliding_window", False)
    ):
        return "sliding-window attention"  # step.c attends to every cached key
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    head_dim = getattr(decoder.layers[0].self_attn, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim > native_step.MAX_HEAD_DIM or head_dim % 2:
        return f"head dim {head_dim}"
    return None


def _unchanged(checks: list[Check]) -> bool:
    return all(container.get(key) is obj for container, key, obj in checks)


class NativeDecoder:
    """The wrapper around one model's decoder ``forward`` that runs decode steps on ``step.c``."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.decoder = model.model
        attn = self.decoder.layers[0].self_attn
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.hidden = config.hidden_size
        self.head_dim, self.scale = attn.head_dim, float(attn.scaling)
        #: Decode steps run natively, and why the others were not (reason -> count).
        self.steps = 0
        self.declined: dict[str, int] = {}
        self._layers: native_step.Layers | None = None
        self._weights: list[native_step.LayerWeights] | None = None
        self._checks: list[Check] = []
        self._lock = threading.Lock()
        self._scratch: torch.Tensor | None = None
        # The weights are read (and every layer checked) once here; steps reuse them while nothing is swapped.
        weights = self._current_weights()
        #: Why no step can run on this model's layers (None: steps can, call by call).
        self.unusable = weights if isinstance(weights, str) else None
        if self.unusable is None:
            self.intermediate = weights[0].projections["gate"][0].shape[0]
            self.eps = float(self.decoder.layers[0].input_layernorm.variance_epsilon)

    # -- what one call needs ------------------------------------------------------------------

    def _decline(self, why: str) -> None:
        self.declined[why] = self.declined.get(why, 0) + 1

    def _selfextend(self) -> tuple[Any, list[Any]] | None:
        """(settings, per-layer states) when SelfExtend groups this step's layers, else None."""
        states = [getattr(layer.self_attn, "_selfextend", None) for layer in self.decoder.layers]
        if states[0] is None or states[0].settings.bypass:
            return None
        return states[0].settings, states

    @staticmethod
    def _key_valid(mask: object, batch: int, n: int) -> torch.Tensor | str | None:
        """Which of the ``n`` keys are real (``batch, n`` uint8; None: all), from a 2-D padding mask
        or the one-row boolean mask transformers builds for a static cache (alone or in a dict by
        layer type); or why it cannot say."""
        if isinstance(mask, dict):  # masks per layer type (Qwen2): every layer here is full attention
            mask = mask.get("full_attention", "no full-attention mask")
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.shape[0] not in (1, batch):
            return "attention mask is not a padding mask or key row"
        if mask.dim() == 4 and mask.dtype == torch.bool and mask.shape[1:3] == (1, 1) and mask.shape[3] >= n:
            if bool(mask[:, 0, 0, n:].any()):
                return "attention mask shows slots past the sequence"
            valid = mask[:, 0, 0, :n]
        elif mask.dim() == 2 and mask.shape[1] >= n:
            valid = mask[:, :n].to(torch.bool)
        else:
            return "attention mask is not a padding mask or key row"
        if bool(valid.all()):
            return None
        return valid.expand(batch, n).to(torch.uint8).contiguous()

    def _current_weights(self) -> list[native_step.LayerWeights] | str:
        """The layers' weights, read again only when a module or tensor was swapped since last read."""
        if self._weights is not None and _unchanged(self._checks):
            return self._weights
        self._weights, self._checks = None, []
        found = [_layer_weights(layer) for layer in self.decoder.layers]
        for f in found:
            if isinstance(f, str):
                return f
        self._weights = [w for w, _ in found]
        self._checks = [(self.decoder._modules, "layers", self.decoder.layers)]
        self._checks += [(self.decoder.layers._modules, str(i), layer) for i, layer in enumerate(self.decoder.layers)]
        self._checks += [c for _, checks in found for c in checks]
        return self._weights

    def step(self, kwargs: dict[str, Any]) -> BaseModelOutputWithPast | None:
        """The decoder's output for this call computed natively, or None (then the model's forward runs).

        One step at a time per model: the layer array and the scratch are shared, and two threads
        decoding on one model would otherwise run on each other's caches (they share the cores anyway).
        """
        with self._lock:
            return self._step(kwargs)

    def _step(self, kwargs: dict[str, Any]) -> BaseModelOutputWithPast | None:
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1:
            return None  # a prefill or another call: not a decode step (not counted)
        if not isinstance(cache, StaticCache):
            return None
        if native.library() is None:
            return self._decline("C kernels off")
        if kwargs.get("inputs_embeds") is not None or kwargs.get("use_cache") is False:
            return self._decline("inputs_embeds or use_cache=False")
        if any(kwargs.get(k) for k in ("output_attentions", "output_hidden_states")) or getattr(
            self.model.config, "output_hidden_states", False
        ):
            return self._decline("attentions or hidden states asked for")
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or self.model.training:
            return self._decline("gradients on, training mode, or compiling")
        batch = ids.shape[0]
        layers = cache.layers
        if (
            batch > native_step.MAX_BATCH
            or len(layers) != len(self.decoder.layers)
            or any(type(layer) is not StaticLayer or not layer.is_initialized for layer in layers)
        ):
            return self._decline("batch or cache layout")
        first = layers[0].keys
        if first.dtype != torch.float32 or first.device.type != "cpu" or first.shape[0] != batch:
            return self._decline("cache not fp32 on the CPU for this batch")
        capacity = first.shape[2]
        slot = int(layers[0].cumulative_length)
        n = slot + 1
        if n > capacity:
            return self._decline("cache full")
        if "cache_position" in kwargs and kwargs["cache_position"] is not None:
            if int(kwargs["cache_position"].reshape(-1)[-1]) != slot:
                return self._decline("cache_position is not the cache's length")
        key_valid = self._key_valid(kwargs.get("attention_mask"), batch, n)
        if isinstance(key_valid, str):
            return self._decline(key_valid)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.full((batch, 1), slot, dtype=torch.long)
        elif positions.shape != (batch, 1) and positions.shape != (1, 1):
            return self._decline("position_ids shape")
        positions = positions.expand(batch, 1)

        weights = self._current_weights()
        if isinstance(weights, str):
            return self._decline(weights)
        grouping = self._selfextend()
        grouped: list[torch.Tensor | None] = [None] * len(weights)
        turns: dict[str, Any] = dict(query_turn=None, key_turn=None, query_factor=None, boundary=0)
        if grouping is not None:
            settings, states = grouping
            cfg = settings.config
            if settings.backend != "auto" or any(s is None or s.layout != "half" for s in states):
                return self._decline("SelfExtend backend or RoPE layout")
            for i, s in enumerate(states):
                mirror = s.static_keys
                if (
                    mirror is None
                    or mirror.owner != layers[i].keys.data_ptr()
                    or mirror.group_size != cfg.group_size
                    or mirror.keys.shape != layers[i].keys.shape
                ):
                    return self._decline("no grouped-key mirror for this cache")
                grouped[i] = mirror.keys
            inv_freq = states[0].inv_freq
            if 2 * inv_freq.shape[-1] != self.head_dim or any(s.inv_freq is not inv_freq for s in states):
                return self._decline("partial or per-layer rotary")
            G, W = cfg.group_size, cfg.neighbor_window
            half = self.head_dim // 2

            def table(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                cos, sin = rotation_tables(delta, inv_freq, torch.float32)
                return cos.reshape(batch, half).contiguous(), sin.reshape(batch, half).contiguous()

            turns["query_turn"] = table(grouped_query_position(positions, G, W) - positions)
            turns["key_turn"] = table(grouped_key_position(positions, G) - positions)
            scaling = cfg.log_scaling(settings.pretrained_context)
            if scaling is not None:
                factor = log_scale_factor(positions, scaling, torch.float32)
                turns["query_factor"] = factor.reshape(batch).contiguous()
            turns["boundary"] = max(0, n - W)

        keys, values = [layer.keys for layer in layers], [layer.values for layer in layers]
        lengths = [layer.cumulative_length for layer in layers]
        held = native_step.held_tensors(weights, keys, values, grouped, lengths)
        if self._layers is None or not self._layers.points_at(held):
            # step.c indexes every layer's tensors by the first key tensor's shape: check them all once
            shape = (batch, self.kv_heads, capacity, self.head_dim)
            tensors = [t for layer in layers for t in (layer.keys, layer.values)]
            tensors += [g for g in grouped if g is not None]
            if any(
                tuple(t.shape) != shape or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()
                for t in tensors
            ):
                return self._decline("cache tensors not all (batch, kv heads, capacity, head dim) fp32 contiguous")
            self._layers = native_step.Layers(weights, keys, values, grouped, lengths)
        need = native_step.scratch_floats(
            batch, self.heads, self.kv_heads, self.head_dim, self.hidden, self.intermediate, capacity
        )
        if self._scratch is None or self._scratch.numel() < need:
            self._scratch = torch.empty(need)

        hidden = self.decoder.embed_tokens(ids).reshape(batch, -1).contiguous()
        cos, sin = self.decoder.rotary_emb(hidden[:, None], positions)
        if cos.shape[-1] != self.head_dim:
            return self._decline("partial or per-layer rotary")  # step.c rotates whole heads
        code = native_step.run(
            self._layers, hidden, heads=self.heads, kv_heads=self.kv_heads, intermediate=self.intermediate,
            capacity=capacity, slot=slot, eps=self.eps, scale=self.scale,
            cos=cos.reshape(batch, -1).float().contiguous(), sin=sin.reshape(batch, -1).float().contiguous(),
            key_valid=key_valid, scratch=self._scratch, **turns,
        )  # fmt: skip
        if code != 0:
            return self._decline(native_step.ERRORS.get(code, f"code {code}"))
        self.steps += 1
        if grouping is not None:
            grouping[0].calls += len(weights)
        return BaseModelOutputWithPast(last_hidden_state=self.decoder.norm(hidden[:, None]), **{_CACHE_FIELD: cache})

    def describe(self) -> dict[str, Any]:
        return {"native_steps": self.steps, "declined": dict(self.declined)}


def install(model: torch.nn.Module) -> NativeDecoder | str:
    """Wrap ``model``'s decoder so that its CPU decode steps run on ``step.c``; or say why not.

    Idempotent (a second call returns the decoder installed first).  :func:`uninstall` undoes it.
    """
    existing = getattr(model, "_selfextend_native", None)
    if existing is not None:
        return existing
    why = why_not(model)
    if why is not None:
        return why
    runner = NativeDecoder(model)
    if runner.unusable is not None:
        return runner.unusable
    original = model.model.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any):
        out = None if args else runner.step(kwargs)
        return out if out is not None else original(*args, **kwargs)

    model.model.forward = forward
    model._selfextend_native = runner
    return runner


def uninstall(model: torch.nn.Module) -> None:
    """Restore the decoder's own ``forward`` (no-op if :func:`install` did not wrap it)."""
    if getattr(model, "_selfextend_native", None) is not None:
        del model.model.forward  # the instance attribute: the class's forward shows through again
        del model._selfextend_native
