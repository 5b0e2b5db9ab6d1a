"""The batcher's KV cache: transformers' dynamic cache, but a decode step writes its token in place.

``DynamicLayer.update`` is ``torch.cat([keys, new])``: every decode step copies every layer's whole cache into
a fresh allocation.  For 16 rows of ~250 tokens on the embedded default that was 148 of a step's 171 ms on the
CPU (large allocations are fresh pages, faulted in one by one).  :class:`GrowingLayer` keeps keys and values in
buffers with room to grow (a quarter more, at least :data:`GROW_MIN` tokens) and exposes views of the filled
part, so a step writes one slot; a cache that is replaced whole (rows joining or leaving the batch, a prefix
loaded) just becomes the new buffer.  Only buffers this module allocated are ever written in place, and only past
the end of every view handed out, so a view kept elsewhere (the prefix cache) never changes.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

#: Fewest free slots a grown buffer gets (a decode step then allocates once every ``GROW_MIN`` steps at most).
GROW_MIN = 64


def _append(buffer: torch.Tensor | None, length: int, new: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``new`` written after the first ``length`` tokens of ``buffer`` (grown when it has no room)."""
    added = new.shape[-2]
    if buffer is None or buffer.dim() != 4 or length + added > buffer.shape[-2]:
        room = length + added + max(GROW_MIN, (length + added) // 4)
        grown = new.new_empty((*new.shape[:-2], room, new.shape[-1]))
        if length:
            grown[..., :length, :] = buffer[..., :length, :]
        buffer = grown
    buffer[..., length : length + added, :] = new
    return buffer, length + added


class _Filled:
    """``keys`` or ``values`` of a :class:`GrowingLayer`: reading gives the filled part of the buffer, assigning
    takes the tensor as the buffer (full, no room yet)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.buffer, self.length = f"_{name}", f"_{name}_length"

    def __get__(self, layer: Any, owner: type | None = None) -> torch.Tensor | None:
        buffer = getattr(layer, self.buffer, None)
        if buffer is None or buffer.dim() != 4:
            return buffer
        return buffer[..., : getattr(layer, self.length), :]

    def __set__(self, layer: Any, value: torch.Tensor | None) -> None:
        setattr(layer, self.buffer, value)
        setattr(layer, self.length, 0 if value is None or value.dim() != 4 else value.shape[-2])


class GrowingLayer(DynamicLayer):
    """A :class:`~transformers.cache_utils.DynamicLayer` whose ``keys``/``values`` are views of larger buffers
    (see the module doc).  Assigning ``keys``/``values`` (as the batcher does when rows join or leave) takes the
    tensor as it is; the next update moves it to a buffer with room."""

    keys = _Filled()
    values = _Filled()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._keys, self._keys_length = _append(self._keys, self._keys_length, key_states)
        self._values, self._values_length = _append(self._values, self._values_length, value_states)
        return self.keys, self.values


class BatchCache(DynamicCache):
    """A dynamic cache of :class:`GrowingLayer` layers (every layer keeps all its keys, as the batcher needs)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)
