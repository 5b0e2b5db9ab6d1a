"""The fast generation path: a static KV cache sized in buckets, and compiled decode steps.

``model.generate`` decodes one token per forward.  Eagerly, that forward is hundreds of small
kernel launches and Python calls, whatever the attention costs; with a static cache
transformers compiles it (``torch.compile``, CUDA graphs on a GPU) and the step becomes a replay.
SelfExtend's decode step is tensor-only (:mod:`.kernels.static_decode`), so it compiles with the rest.

Caches are sized in buckets (four per doubling, so at most 25% of the slots are spare) and the
cache object of the last bucket is kept and reset, so a later call of a similar length reuses its
memory and its CUDA graphs.  The first bucket compiles for its shape, the second compiles a graph
with the cache length symbolic, and later buckets reuse that one (only recording their CUDA graphs);
:attr:`FastGeneration.first_calls` records how long each bucket's first call took (Inductor also
caches compiled kernels on disk between processes).

If compiling fails on some model, generation falls back to the dynamic cache with one warning
that says why, and stays there for this model.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from typing import Any

import torch

#: Smallest static cache, in tokens.
MIN_BUCKET = 256

#: Compiled decode graphs one process may hold before they are all dropped and compiled again as calls
#: need them.  Every (cache bucket, grouping) pair can be one graph; dynamo's default limit (8) is fewer
#: than one document-sized workload meets (prompts of 2k-8k alone span nine buckets), and hitting it
#: mid-run means recompiling every shape again (on an H100 ~30 s each for the default model, 2-4 s for
#: a tiny one).  The graphs share one CUDA-graph memory pool and the cache is an input, not graph
#: memory, so more of them cost little.
GRAPH_LIMIT = 64


def cache_bucket(total_tokens: int) -> int:
    """Static-cache length for ``total_tokens`` (prompt + new tokens): the next of
    ``2^k * {1, 1.25, 1.5, 1.75}`` at or above it, at least :data:`MIN_BUCKET`."""
    if total_tokens < 1:
        raise ValueError(f"total_tokens must be >= 1, got {total_tokens}")
    if total_tokens <= MIN_BUCKET:
        return MIN_BUCKET
    octave = 1 << (total_tokens.bit_length() - 1)  # largest power of two <= total
    for quarter in (4, 5, 6, 7, 8):
        size = octave * quarter // 4
        if size >= total_tokens:
            return size
    raise AssertionError("unreachable: 2 * octave >= total_tokens")


def compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this model does not compile", not "this input is wrong"."""
    errors: list[type[BaseException]] = [torch._dynamo.exc.TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:  # older torch
        pass
    return tuple(errors)


def recompile_limit_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "too many compiled shapes": each cache bucket and grouping is a graph, and
    dynamo refuses the ninth under ``fullgraph`` (not a ``TorchDynamoException``)."""
    errors: list[type[BaseException]] = []
    for name in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit", "RecompileLimitExceeded", "CacheLimitExceeded"):
        err = getattr(torch._dynamo.exc, name, None)
        if isinstance(err, type) and issubclass(err, BaseException):
            errors.append(err)
    return tuple(errors)


class FastGeneration:
    """Per-model state of the fast path: whether it is on, the cache kept, first-call timings."""

    def __init__(self, model: torch.nn.Module, enabled: bool, compile: bool | None = None):
        self.model = model
        self.enabled = enabled
        #: Compile the decode step (default: on CUDA).  On the CPU the static cache alone is what pays:
        #: it ends the dynamic cache's copy of every layer's keys and values at every step.
        self.compile = compile
        #: Why the fast path was turned off after a failure (None while it works).
        self.failed: str | None = None
        #: Seconds the first call of each ``(batch, bucket)`` took, compilation included.
        self.first_calls: dict[tuple[int, int], float] = {}
        self._cache = None
        self._cache_key: tuple | None = None
        params = inspect.signature(model.forward).parameters
        #: The name ``generate`` takes the cache under ("cache" from transformers 5.24 on).
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        #: How often the compiled graphs were dropped on reaching dynamo's recompile limit.
        self.compile_resets = 0

    @property
    def active(self) -> bool:
        return self.enabled and self.failed is None

    def generate_kwargs(self, batch: int, total_tokens: int) -> dict[str, Any]:
        """Extra ``generate`` arguments for this call: a reset static cache and a compile config."""
        if not self.active:
            return {}
        from transformers import CompileConfig, StaticCache

        bucket = cache_bucket(total_tokens)
        device = next(self.model.parameters()).device
        key = (batch, bucket, self.model.dtype, device)
        if self._cache_key != key:
            self._cache = None  # free the old bucket's memory before allocating the new one
            cache = StaticCache(config=self.model.config, max_cache_len=bucket)
            if any(getattr(cache, "is_sliding", ())):
                # transformers' static sliding-window layers keep a Python int length, so every
                # decode step would compile anew (measured: the recompile limit after 8 tokens).
                self.failed = "sliding-window layers recompile every step under a static cache"
                return {}
            self._cache, self._cache_key = cache, key
        else:
            with torch.inference_mode():  # generate makes the cache's tensors inference tensors
                self._cache.reset()
        if not (device.type == "cuda" if self.compile is None else self.compile):
            return {self.cache_arg: self._cache}
        # dynamic=None: dynamo's automatic dynamic shapes.  The first bucket compiles for its shape; the second
        # compiles once more with the cache length symbolic, and every later bucket reuses that graph (on an
        # H100 a compile is ~30 s: one per bucket was minutes for a workload of mixed lengths).  CUDA graphs are
        # still recorded per shape, which is cheap, so a step is a replay as before.
        config = CompileConfig(fullgraph=True, dynamic=None)
        if device.type != "cuda":
            config._compile_all_devices = True  # transformers compiles only on accelerators by default
        return {self.cache_arg: self._cache, "compile_config": config}

    def compile_scope(self) -> contextlib.AbstractContextManager:
        """Dynamo's recompile limit raised to :data:`GRAPH_LIMIT` (never lowered) for one compiled call.

        Scoped, not set for the process: the user's own ``torch.compile`` code keeps its own limit."""
        current = torch._dynamo.config.recompile_limit
        return torch._dynamo.config.patch(recompile_limit=max(current, GRAPH_LIMIT))

    def timed(self, batch: int, total_tokens: int, started: float) -> None:
        """Record the wall time of the first call in a bucket (the one that compiled)."""
        key = (batch, cache_bucket(total_tokens))
        if self.active and key not in self.first_calls:
            self.first_calls[key] = time.perf_counter() - started

    def forget_compiled(self, err: BaseException) -> None:
        """Drop every compiled graph after dynamo's recompile limit (``err``): the next calls compile
        their own shapes afresh, so the number of shapes a process meets is unbounded and the set of
        graphs alive at once stays bounded (the call that hit the limit finishes on the dynamic cache)."""
        torch.compiler.reset()
        self.compile_resets += 1
        self.first_calls.clear()
        self._cache = self._cache_key = None
        warnings.warn(
            f"{type(err).__name__}: more compiled shapes than torch._dynamo.config.recompile_limit; the compiled "
            "decode graphs were dropped and are compiled again as calls need them (this call finishes uncompiled)",
            RuntimeWarning,
            stacklevel=3,
        )

    def disable(self, err: BaseException) -> None:
        """Turn the fast path off for this model after ``err``, with one warning."""
        self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        self._cache = self._cache_key = None
        warnings.warn(
            f"compiled static-cache generation failed on this model ({self.failed}); falling back to the dynamic "
            "cache for this and later calls (same tokens, slower decoding). Pass fast_generation=False to load() "
            "to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "active": self.active,
            "failed": self.failed,
            "compile_resets": self.compile_resets,
            "first_call_seconds": {f"batch {b}, cache {n}": round(s, 2) for (b, n), s in self.first_calls.items()},
        }
