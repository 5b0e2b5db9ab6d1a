"""Turn SelfExtend on and off for a loaded transformers model.

No model class is patched: :func:`apply` tags each full-attention module with its rotary
frequencies and RoPE layout, then switches the model to the ``"selfextend"`` attention
implementation registered with transformers.  :func:`remove` switches back.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch

from .. import tuning, validation
from ..attention import Backend, check_backend
from ..config import SelfExtendConfig
from . import attention as hf_attention
from .attention import LayerState, RuntimeSettings

#: RoPE variants whose frequencies are fixed for a forward pass, so extra rotations compose.
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3", "yarn", "longrope", "proportional"}
ALIBI_MODEL_TYPES = {"bloom", "mpt", "baichuan", "jais"}
SLIDING_LAYER_TYPES = {"sliding_attention", "chunked_attention", "local_attention"}


class UnsupportedModelError(ValueError):
    """The model cannot run SelfExtend; the message says why and what to use instead."""


def text_config(model: torch.nn.Module):
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def kv_heads(config: Any) -> int:
    """Key/value heads of a text config: ``num_key_value_heads``, or every attention head where it is unset
    (multi-head attention configs leave it out)."""
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def pretrained_context(model: torch.nn.Module) -> int:
    """The context length the model was trained on (``max_position_embeddings``)."""
    cfg = text_config(model)
    for name in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedModelError(
        f"cannot tell the trained context of {type(model).__name__}: its config has no max_position_embeddings"
    )


def _rope_types(cfg) -> dict[str, str]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return {layer: p.get("rope_type", p.get("type", "default")) for layer, p in params.items()}
    return {"*": params.get("rope_type", params.get("type", "default")) if params else "default"}


def _rotary_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, list[str]]]:
    found = []
    for module in model.modules():
        names = [n for n, _ in module.named_buffers(recurse=False) if n.endswith("inv_freq") and "original" not in n]
        if names:
            found.append((module, names))
    return found


def _layout(attn: torch.nn.Module) -> str:
    """Which channels the model pairs, probed from its own ``rotate_half``."""
    mod = sys.modules.get(type(attn).__module__)
    if mod is not None and hasattr(mod, "rotate_every_two"):
        return "interleaved"
    fn = getattr(mod, "rotate_half", None)
    if fn is None:
        raise UnsupportedModelError(
            f"cannot tell the RoPE channel layout of {type(attn).__name__}: its module has no rotate_half"
        )
    probe = torch.arange(1.0, 5.0)
    out = fn(probe)
    if torch.equal(out, torch.tensor([-3.0, -4.0, 1.0, 2.0])):
        return "half"
    if torch.equal(out, torch.tensor([-2.0, 1.0, -4.0, 3.0])):
        return "interleaved"
    raise UnsupportedModelError(f"unrecognised RoPE layout in {type(attn).__name__}.rotate_half")


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)
    ]


def check_supported(model: torch.nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` for models SelfExtend cannot extend, naming the reason."""
    cfg = text_config(model)
    name = type(model).__name__
    if not _rotary_modules(model):
        alibi = getattr(cfg, "alibi", False) or getattr(cfg, "model_type", "") in ALIBI_MODEL_TYPES
        kind = "ALiBi attention biases" if alibi else "learned or no position embeddings"
        raise UnsupportedModelError(
            f"{name} has no rotary position embedding (it uses {kind}); SelfExtend regroups RoPE positions and "
            "only works on RoPE models such as Llama, Mistral, Qwen, Gemma or Phi-3"
        )
    for layer, rope_type in _rope_types(cfg).items():
        if rope_type not in SUPPORTED_ROPE_TYPES:
            where = "" if layer == "*" else f" for {layer} layers"
            raise UnsupportedModelError(
                f"{name} uses rope_type={rope_type!r}{where}, which SelfExtend does not support: "
                + (
                    "dynamic NTK changes the frequencies as the sequence grows, so grouped positions would not "
                    "compose; load the model with its plain RoPE and let SelfExtend extend it"
                    if rope_type == "dynamic"
                    else f"supported types are {sorted(SUPPORTED_ROPE_TYPES)}"
                )
            )
    if not _attention_modules(model):
        raise UnsupportedModelError(f"{name} has no attention modules with a layer_idx; is it a transformers 5 model?")


def _freq_source(rotaries: list[tuple[torch.nn.Module, list[str]]], layer_type: str) -> tuple[torch.nn.Module, str]:
    for module, names in rotaries:
        if f"{layer_type}_inv_freq" in names:
            return module, f"{layer_type}_inv_freq"
    for module, names in rotaries:
        if "inv_freq" in names:
            return module, "inv_freq"
    raise UnsupportedModelError(f"no rotary frequencies found for {layer_type} layers")


def apply(
    model: torch.nn.Module,
    config: SelfExtendConfig | None = None,
    *,
    target_context: int | None = None,
    backend: Backend = "auto",
) -> torch.nn.Module:
    """Enable SelfExtend on ``model`` in place and return it.

    With no ``config``, ``G`` and ``W`` are chosen for ``target_context`` (default: four times
    the trained window) by :meth:`SelfExtendConfig.for_target`.  Sliding-window layers stay
    plain; every full-attention layer uses grouped attention beyond ``W`` tokens.

    ``backend`` picks the kernels; ``"auto"`` is right for almost everyone (on CUDA: the split
    prefill and split-K decode).  ``"triton"`` keeps prefill on the one-pass Triton kernel
    (about 1.25x plain attention's transient memory instead of 2.2x, ~30% slower at 32k+),
    ``"flex"`` the flex_attention path, ``"math"``/``"cpu_flash"``/``"cuda_efficient"`` the
    block path on that kernel.
    """
    check_backend(backend)
    validation.optional_integer("target_context", target_context, minimum=1)
    if config is not None and not isinstance(config, SelfExtendConfig):
        raise TypeError(f"config must be a SelfExtendConfig, got {type(config).__name__}")
    check_supported(model)
    trained = pretrained_context(model)
    config = tuning.plan(None, trained, target_context=target_context, config=config, adaptive=False).config
    if is_applied(model):
        remove(model)
    cfg = text_config(model)
    rotaries = _rotary_modules(model)
    layer_types = getattr(cfg, "layer_types", None)
    settings = RuntimeSettings(config=config, pretrained_context=trained, backend=backend)
    extended = 0
    for attn in _attention_modules(model):
        layer_type = layer_types[attn.layer_idx] if layer_types else "full_attention"
        if (
            layer_type in SLIDING_LAYER_TYPES
            or getattr(attn, "sliding_window", None)
            or getattr(attn, "is_sliding", False)
        ):
            continue
        rotary, attr = _freq_source(rotaries, layer_type)
        attn._selfextend = LayerState(settings=settings, rotary=rotary, freq_attr=attr, layout=_layout(attn))
        extended += 1
    if extended == 0:
        raise UnsupportedModelError(f"{type(model).__name__} has no full-attention RoPE layers to extend")
    hf_attention.register()
    model._selfextend_previous_attn = cfg._attn_implementation
    model._selfextend_settings = settings
    _set_attn(model, hf_attention.ATTN_NAME)
    return model


def _set_attn(model: torch.nn.Module, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError, KeyError) as err:  # older 5.x or a config without sub-configs
        warnings.warn(f"set_attn_implementation({name!r}) failed ({err}); setting the config directly", stacklevel=3)
        for module in model.modules():
            conf = getattr(module, "config", None)
            if conf is not None and hasattr(conf, "_attn_implementation"):
                conf._attn_implementation = name


def is_applied(model: torch.nn.Module) -> bool:
    return getattr(model, "_selfextend_settings", None) is not None


def settings_of(model: torch.nn.Module) -> RuntimeSettings:
    settings = getattr(model, "_selfextend_settings", None)
    if settings is None:
        raise ValueError("SelfExtend is not applied to this model; call selfextend_llm.apply(model) first")
    return settings


def clear_cache(model: torch.nn.Module, *, keep_static: bool = False) -> None:
    """Drop the grouped-key caches kept between decode steps (frees about one K cache of memory).

    The next call rebuilds what it needs, so this never changes a result.  ``keep_static`` keeps
    the mirrors of a static cache that will be reused (same addresses, so compiled graphs replay).
    """
    for attn in _attention_modules(model):
        state = getattr(attn, "_selfextend", None)
        if state is not None:
            state.key_caches = []
            if not keep_static:
                state.static_keys = None


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation the model had before :func:`apply`."""
    if not is_applied(model):
        return model
    for attn in _attention_modules(model):
        if hasattr(attn, "_selfextend"):
            del attn._selfextend
    previous = model._selfextend_previous_attn or "sdpa"
    model._selfextend_settings = None
    _set_attn(model, previous)
    return model
