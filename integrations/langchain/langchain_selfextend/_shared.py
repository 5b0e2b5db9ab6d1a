"""Loaded models shared between LangChain objects with the same model arguments."""

from __future__ import annotations

import threading
from typing import Any

from selfextend_llm import SelfExtendModel, load

_MODELS: dict[tuple, SelfExtendModel] = {}
_LOCK = threading.Lock()


def shared_model(**kwargs: Any) -> SelfExtendModel:
    """Load once per distinct set of loading arguments; later calls reuse the same weights."""
    key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = load(**kwargs)
        return _MODELS[key]
