"""selfextend-llm: hand a whole long document to a local RoPE LLM, no fine-tuning.

``apply(model)`` turns SelfExtend on for a loaded transformers model; ``load()`` returns a
ready :class:`SelfExtendModel` (the embedded SmolLM2 default when no model is named).
"""

from .config import SelfExtendConfig
from .hf.apply import UnsupportedModelError, apply, clear_cache, is_applied, remove

__version__ = "0.1.0"

__all__ = [
    "SelfExtendConfig",
    "SelfExtendModel",
    "UnsupportedModelError",
    "apply",
    "clear_cache",
    "is_applied",
    "load",
    "load_shared",
    "remove",
    "__version__",
]


def __getattr__(name: str):
    # Loading pulls in tokenizers and the GGUF reader; keep `import selfextend_llm` light.
    if name in ("load", "load_shared", "SelfExtendModel"):
        from . import model

        return getattr(model, name)
    raise AttributeError(name)
