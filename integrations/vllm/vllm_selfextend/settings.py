"""What the vLLM backend needs to know about a model, decided before the engine starts.

:func:`engine_args` (in ``__init__``) checks the model folder, plans G and W with the project's own
tuning (as ``selfextend_llm.load`` does) and writes the result into the model config through vLLM's
``hf_overrides`` under :data:`KEY`; every worker's backend reads it back with :meth:`Settings.from_config`.
Nothing here imports vLLM, so the checks run (and fail with a clear message) in the caller's process.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from selfextend_llm import tuning, validation
from selfextend_llm.config import SelfExtendConfig
from selfextend_llm.hf.apply import SLIDING_LAYER_TYPES, SUPPORTED_ROPE_TYPES, UnsupportedModelError

#: The key under which the settings travel in the model config (``hf_overrides``).
KEY = "selfextend"
#: A file ``selfextend-llm export`` writes beside ``config.json``: the name the tuned table knows the model by.
MARKER = "selfextend.json"


@dataclass(frozen=True)
class Settings:
    """SelfExtend for one served model: one grouping for every request.

    Inside vLLM a request's attention sees its length *so far*, never its final length, and a grouping
    must hold for a request's whole life (the keys of its early tokens feed every later layer), so the
    engine runs the one setting planned for ``context_window``: what ``selfextend_llm.load`` plans for
    a call of that length (the measured table where the model has one, else the rule of thumb).
    ``load`` in-process re-plans per call, by the call's own length.
    """

    model_name: str
    pretrained_context: int
    context_window: int
    group_size: int
    neighbor_window: int
    log_scale: float = 0.0  # strength of log-scaled queries (SelfExtendConfig.log_scale)
    source: str = "rule of thumb"

    def config_for(self, n_tokens: int) -> SelfExtendConfig:
        """The grouping of a request of ``n_tokens`` (the same for all: see the class doc)."""
        return SelfExtendConfig(self.group_size, self.neighbor_window, log_scale=self.log_scale)

    def to_override(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, hf_config: Any) -> Settings:
        raw = getattr(hf_config, KEY, None)
        if not isinstance(raw, dict):
            raise RuntimeError(
                "the SelfExtend attention backend was selected without its settings; start vLLM with "
                "vllm_selfextend.engine_args(...) (or the flags `selfextend-llm vllm-args` prints)"
            )
        return cls(**raw)


def read_config(folder: str | Path) -> Any:
    """The transformers config of a model folder; a clear error for anything that is not one."""
    from transformers import AutoConfig

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model folder {str(folder)!r} does not exist; pass a transformers model folder (write one from a GGUF or "
            "the embedded default with: selfextend-llm export OUT_DIR)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a transformers model folder (no config.json); vLLM loads folders, not GGUF "
            "files: write one with `selfextend-llm export OUT_DIR --model FILE.gguf`"
        )
    config = AutoConfig.from_pretrained(path)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_name(folder: str | Path) -> str:
    """The name the tuned table knows the model by (written by ``selfextend-llm export``), else the folder name."""
    marker = Path(folder) / MARKER
    if marker.is_file():
        return str(json.loads(marker.read_text())["model_name"])
    return Path(folder).resolve().name


def check_servable(config: Any, name: str) -> int:
    """The trained context of a model the backend can serve; :class:`UnsupportedModelError` saying why not."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    model_type = getattr(config, "model_type", "model")
    if not params and getattr(config, "rope_theta", None) is None:
        raise UnsupportedModelError(
            f"{name} ({model_type}) has no rotary position embedding; SelfExtend regroups RoPE positions and only "
            "serves RoPE models such as Llama, Mistral, Qwen or Phi-3"
        )
    layered = params and all(isinstance(v, dict) for v in params.values())
    for p in params.values() if layered else [params]:
        if "mrope_section" in p or p.get("rope_type") in ("mrope", "3d"):
            raise UnsupportedModelError(
                f"{name} uses multimodal RoPE (M-RoPE), whose positions are not one token index; the SelfExtend "
                "backend serves text models with one position per token"
            )
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"{name} uses rope_type={rope_type!r}; the SelfExtend backend supports {sorted(SUPPORTED_ROPE_TYPES)}"
            )
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) or any(t in SLIDING_LAYER_TYPES for t in layer_types):
        raise UnsupportedModelError(
            f"{name} has sliding-window attention layers; the SelfExtend vLLM backend serves full-attention models "
            "only (in-process, `selfextend_llm.load` extends such models and keeps their sliding layers plain)"
        )
    trained = getattr(config, "max_position_embeddings", None)
    if not isinstance(trained, int) or trained < 2:
        raise UnsupportedModelError(f"cannot tell the trained context of {name}: no max_position_embeddings")
    return trained


def plan(
    folder: str | Path,
    *,
    target_context: int | None = None,
    group_size: int | None = None,
    neighbor_window: int | None = None,
    log_scale: float | bool | None = None,
) -> Settings:
    """G and W for serving ``folder``, planned as ``selfextend_llm.load`` plans them; refuses what cannot reach.

    ``log_scale``: with ``group_size``, the strength of log-scaled queries (as in ``load``)."""
    log_scale = validation.log_strength(log_scale, group_size)
    config = read_config(folder)
    name = model_name(folder)
    trained = check_servable(config, name)
    chosen = tuning.plan(
        name, trained, target_context=target_context, group_size=group_size, neighbor_window=neighbor_window,
        log_scale=log_scale,
    )  # fmt: skip
    cfg = chosen.config
    source = tuning.SOURCE_FIXED if group_size is not None else chosen.source_for(chosen.context_window)
    return Settings(
        model_name=name,
        pretrained_context=trained,
        context_window=chosen.context_window,
        group_size=cfg.group_size,
        neighbor_window=cfg.neighbor_window,
        log_scale=cfg.log_scale,
        source=source,
    )


def inv_freq(config: Any, head_size: int) -> tuple[torch.Tensor, str]:
    """The model's rotary frequencies (float64) and which RoPE type gave them."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        rotary = int(head_size * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
        freqs = 1.0 / theta ** (torch.arange(0, rotary, 2, dtype=torch.float64) / rotary)
        return freqs, rope_type
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    freqs, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return freqs.double(), rope_type
