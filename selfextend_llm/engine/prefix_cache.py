"""Prefix reuse: the KV of recent prompts, kept under a memory budget, found by longest shared token prefix.

Two questions about one document share the document's tokens; a chat that goes on shares every earlier
turn.  Ollama, llama-server and vLLM keep the KV of such prefixes; so does this cache.  An entry is the
keys and values of every layer for a run of tokens, with the grouping that computed them: keys of the
second layer on depend on the first layer's attention output, so on G and W.  A call continues an entry
only under the entry's grouping (:meth:`PrefixCache.lookup` takes the caller's rule for which groupings
are acceptable), and the cached tokens are never recomputed.

Entries are stored as whole sequences and matched token by token (a few entries, compared as tensors,
in microseconds); an entry that another extends is dropped, and the least recently used ones go first
once the budget is exceeded.  :func:`save` / :func:`load` write an entry to disk, so that a later
process skips the prefill of a document it has seen.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import SelfExtendConfig

#: File format of :func:`save` (bumped when the layout changes; older files are refused with a message).
FORMAT_VERSION = 1
#: Shortest prefix worth reusing: below it a lookup misses (copying a few keys costs more than computing them).
MIN_REUSE_TOKENS = 16


@dataclass
class PrefixEntry:
    """The keys and values of every layer for ``tokens``, computed under ``config`` (None: the plain model)."""

    tokens: torch.Tensor  # (n,) int64, on the CPU
    config: SelfExtendConfig | None
    keys: list[torch.Tensor]  # per layer (1, kv_heads, n, head_dim)
    values: list[torch.Tensor]
    hits: int = field(default=0)

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def shared_prefix(self, tokens: torch.Tensor) -> int:
        """How many leading tokens ``tokens`` shares with this entry."""
        return shared_length(self.tokens, tokens)


@dataclass
class Hit:
    """What a lookup found: the first ``length`` tokens of ``entry`` are reusable."""

    entry: PrefixEntry
    length: int

    def kv(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer keys and values of the reused tokens (views: never written to)."""
        n = self.length
        return [k[:, :, :n] for k in self.entry.keys], [v[:, :, :n] for v in self.entry.values]

    def load_into(self, cache: Any) -> None:
        """Write the reused keys and values into a fresh transformers cache (static or dynamic) as its first
        tokens: the single path's cache and a batcher prefill start this way."""
        keys, values = self.kv()
        position = torch.arange(self.length, device=keys[0].device)
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            cache.update(k, v, layer, {"cache_position": position})


class PrefixCache:
    """Recent prompts' KV, least recently used first out, at most ``max_bytes`` in all (0: off).

    Thread-safe: the single-sequence path and the batcher share one cache per model.
    """

    def __init__(self, max_bytes: int, *, min_tokens: int = MIN_REUSE_TOKENS):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"prefix cache budget must be a whole number of bytes >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()
        self.lookups = 0
        self.hits = 0
        self.reused_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(
        self, tokens: Sequence[int] | torch.Tensor, accepts: Callable[[SelfExtendConfig | None, int], bool]
    ) -> Hit | None:
        """The longest reusable prefix of ``tokens`` among entries that ``accepts(grouping, shared tokens)``.

        At least one token is always left to compute (its logits give the first new token).
        """
        if not self.enabled:
            return None
        tokens = _as_tensor(tokens)
        with self._lock:
            self.lookups += 1
            best: tuple[int, int] | None = None
            for key, entry in self._entries.items():
                n = min(entry.shared_prefix(tokens), int(tokens.shape[0]) - 1)
                if n >= self.min_tokens and (best is None or n > best[1]) and accepts(entry.config, n):
                    best = (key, n)
            if best is None:
                return None
            key, n = best
            self._entries.move_to_end(key)
            entry = self._entries[key]
            entry.hits += 1
            self.hits += 1
            self.reused_tokens += n
            return Hit(entry, n)

    def peek(self, tokens: Sequence[int] | torch.Tensor) -> Hit | None:
        """The longest cached prefix of ``tokens`` under any grouping, all of them included; for reports
        and saving (no statistics, no change of the recency order)."""
        tokens = _as_tensor(tokens)
        with self._lock:
            found = [(e.shared_prefix(tokens), e) for e in self._entries.values()]
        n, entry = max(found, key=lambda x: x[0], default=(0, None))
        return None if entry is None or n == 0 else Hit(entry, n)

    def store(
        self,
        tokens: Sequence[int] | torch.Tensor,
        config: SelfExtendConfig | None,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
    ) -> PrefixEntry | None:
        """Keep the KV of ``tokens`` (the tensors are kept as given: pass copies of buffers that change).

        An entry that this one extends (same grouping, its tokens a prefix of these) is dropped; one that
        extends this one makes storing it pointless.  Returns the entry, or None when not kept.
        """
        tokens = _as_tensor(tokens)
        n = int(tokens.shape[0])
        if not self.enabled or n < self.min_tokens:
            return None
        entry = PrefixEntry(tokens, config, list(keys), list(values))
        if any(k.shape[2] != n for k in entry.keys) or any(v.shape[2] != n for v in entry.values):
            raise ValueError(f"prefix cache: keys and values must hold {n} tokens (the length of tokens)")
        size = entry.nbytes
        if size > self.max_bytes:
            return None
        with self._lock:
            for key, old in list(self._entries.items()):
                if old.config != config:
                    continue
                shared = old.shared_prefix(tokens)
                if shared == old.length:  # the new entry extends (or repeats) this one
                    del self._entries[key]
                elif shared == n:  # an entry already holds all of these tokens
                    self._entries.move_to_end(key)
                    return None
            self._entries[self._next] = entry
            self._next += 1
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.max_bytes and self._entries:
                _, gone = self._entries.popitem(last=False)
                total -= gone.nbytes
        return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def entries(self) -> list[PrefixEntry]:
        """The kept entries, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def describe(self) -> dict[str, Any]:
        with self._lock:
            entries = list(self._entries.values())
        return {
            "enabled": self.enabled,
            "budget_bytes": self.max_bytes,
            "used_bytes": sum(e.nbytes for e in entries),
            "entries": [e.length for e in entries],
            "lookups": self.lookups,
            "hits": self.hits,
            "reused_tokens": self.reused_tokens,
        }


def shared_length(a: Sequence[int] | torch.Tensor, b: Sequence[int] | torch.Tensor) -> int:
    """How many leading tokens two token sequences have in common."""
    a, b = _as_tensor(a), _as_tensor(b)
    n = min(int(a.shape[0]), int(b.shape[0]))
    if n == 0:
        return 0
    differ = (a[:n] != b[:n]).nonzero()
    return n if differ.numel() == 0 else int(differ[0, 0])


def _as_tensor(tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().reshape(-1).to("cpu", torch.long)
    return torch.tensor(list(tokens), dtype=torch.long)


def default_budget(device: torch.device) -> int:
    """An eighth of the memory free now on ``device`` (RAM for the CPU), at most 8 GiB.

    An eighth leaves the model, its working cache and the batcher their room; the environment
    variable ``SELFEXTEND_PREFIX_CACHE_BYTES`` overrides it (0 turns reuse off)."""
    value = env_bytes("SELFEXTEND_PREFIX_CACHE_BYTES", minimum=0, note=" (0: off)")
    return min(8 << 30, free_memory(device) // 8) if value is None else value


def env_bytes(name: str, *, minimum: int, note: str = "") -> int | None:
    """A byte count from the environment variable ``name`` (None when unset), refused with a message naming
    the variable when it is not a whole number >= ``minimum`` (the memory budgets' overrides)."""
    env = os.environ.get(name)
    if env is None:
        return None
    try:
        value = int(env)
    except ValueError:
        raise ValueError(f"{name} must be a whole number of bytes{note}, got {env!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def free_memory(device: torch.device) -> int:
    """Bytes free now on ``device``: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


# --------------------------------------------------------------------------- on disk
def save(entry: PrefixEntry, path: str | os.PathLike, *, model_name: str, fingerprint: dict[str, Any]) -> None:
    """Write ``entry`` to ``path`` (written to a temporary file and renamed: never a half-written file)."""
    payload = {
        "format": FORMAT_VERSION,
        "model": model_name,
        "fingerprint": fingerprint,
        "tokens": entry.tokens,
        "config": None
        if entry.config is None
        else [entry.config.group_size, entry.config.neighbor_window, float(entry.config.log_scale)],
        "keys": [k.detach().cpu().contiguous() for k in entry.keys],
        "values": [v.detach().cpu().contiguous() for v in entry.values],
    }
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(
    path: str | os.PathLike, *, model_name: str, fingerprint: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> PrefixEntry:
    """Read an entry written by :func:`save`, refusing one made by another model or format."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no prompt cache file at {path!r}; write one with save_prompt_cache() first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or not a torch file
        raise ValueError(
            f"{path!r} is not a readable prompt cache ({type(err).__name__}: {err}); delete it and save it again"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path!r} is not a prompt cache of format {FORMAT_VERSION}; save it again with this version")
    if payload.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{path!r} was saved by model {payload.get('model')!r} with another shape "
            f"({payload.get('fingerprint')}); this model is {model_name!r} ({fingerprint}): save it again with this "
            "model"
        )
    config = None if payload["config"] is None else SelfExtendConfig(*payload["config"])
    return PrefixEntry(
        payload["tokens"].to(torch.long),
        config,
        [k.to(device=device, dtype=dtype) for k in payload["keys"]],
        [v.to(device=device, dtype=dtype) for v in payload["values"]],
    )
