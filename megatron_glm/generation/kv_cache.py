"""Key/value cache for incremental decoding with :class:`~megatron_glm.model.GLMModel`.

GLM adds its (block) position embeddings to the input, so a position's keys and values never change
once computed: Part A is encoded once and each generated token adds one column per layer. Buffers are
preallocated per layer (``[b, heads / tp, capacity, head_dim]``, allocated on first use with the keys'
dtype and device) and grown by doubling, so appending is a copy of the new positions only.
"""

from __future__ import annotations

import torch


class _LayerCache:
    """One layer's buffers; ``update`` appends and returns views of everything cached so far."""

    __slots__ = ("capacity", "k", "length", "v")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def _grow(self, like: torch.Tensor, needed: int) -> None:
        capacity = max(self.capacity, needed, 2 * (self.k.shape[2] if self.k is not None else 0))
        b, h, _, d = like.shape
        k = like.new_empty(b, h, capacity, d)
        v = like.new_empty(b, h, capacity, d)
        if self.k is not None and self.length:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            self._grow(k, end)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


class KVCache:
    """Keys and values of every layer, for the positions already run through the model.

    Pass it as ``model(ids, positions, mask, kv_cache=cache)``: the model appends the new positions'
    keys/values (``layer(i).update``); ``length`` is how many positions are cached. ``capacity`` is the
    initial buffer length (grown as needed). :meth:`reorder` selects / repeats batch rows (beam search).
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = max(1, int(capacity))
        self._layers: dict[int, _LayerCache] = {}

    def layer(self, index: int) -> _LayerCache:
        """Global layer ``index``'s cache (created empty on first use)."""
        cache = self._layers.get(index)
        if cache is None:
            cache = self._layers[index] = _LayerCache(self.capacity)
        return cache

    @property
    def length(self) -> int:
        """Positions cached (the same for every layer between forwards)."""
        return min((c.length for c in self._layers.values()), default=0)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (``[b']`` long, may repeat rows) of every layer."""
        for cache in self._layers.values():
            cache.reorder(index)
