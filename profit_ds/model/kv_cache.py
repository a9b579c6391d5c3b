"""A KV cache that appends new positions in place, into room reserved for the whole call.

transformers' `DynamicCache` appends each decoding step's keys and values with `torch.cat`,
which copies the whole cache of every layer at every step: on a CPU, for SmolLM2 scoring 64
rows of ~300 positions, that copy was most of a decode step (docs/BENCHMARKS.md). A generate
call knows its length in advance (its padded context and `max_new_tokens`), so this cache
reserves that room once and writes each step's position into it; the keys and values the
attention reads are views of the filled part, the same numbers in the same shapes as
`DynamicCache`'s, so the same tokens. Dropping finished rows copies the live rows' room once
(`select_rows`), instead of the whole cache at every step, and rows prefilled later join the
batch with one copy too (`join`, continuous batching: `evaluation/generate.py`).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class ReservedLayer(DynamicLayer):
    """One decoder layer's keys and values in buffers of `capacity` positions."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        stop = start + key_states.shape[-2]
        if self._room is None or stop > self._room[0].shape[-2]:
            self._reserve(key_states, value_states, max(stop, self.capacity))
        for room, new in zip(self._room, (key_states, value_states)):
            room[:, :, start:stop] = new
        self.keys, self.values = (room[:, :, :stop] for room in self._room)
        return self.keys, self.values

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor,
                 positions: int) -> None:
        """Fresh buffers of `positions` positions, holding what is cached so far."""
        filled = self.get_seq_length()
        rooms = []
        for old, like in ((self.keys, key_states), (self.values, value_states)):
            shape = (*like.shape[:-2], positions, like.shape[-1])
            room = like.new_empty(shape)
            if filled:
                room[:, :, :filled] = old
            rooms.append(room)
        self._room = (rooms[0], rooms[1])

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (and repeat) batch rows `rows`, room included: one copy of the kept rows
        (`index_select`, the determinism rule of `model/prompted.py`)."""
        if self._room is None:
            return
        filled = self.get_seq_length()
        self._room = tuple(room.index_select(0, rows) for room in self._room)
        self.keys, self.values = (room[:, :, :filled] for room in self._room)


    def join(self, other: "ReservedLayer", keep: int, capacity: int) -> None:
        """Take `other`'s rows in below this layer's, in fresh room of `capacity` positions:
        this layer's rows keep their last `keep` positions (all they still attend to), and
        both sides end at the same position, the wider one's length, with zeros before the
        narrower (a masked position must still be finite: attention multiplies it by 0)."""
        mine, theirs = self.get_seq_length(), other.get_seq_length()
        width = max(keep, theirs)
        rooms = []
        for old, new in ((self.keys, other.keys), (self.values, other.values)):
            rows = old.shape[0]
            room = old.new_empty(rows + new.shape[0], old.shape[1], max(capacity, width),
                                 old.shape[3])
            room[:rows, :, : width - keep] = 0
            room[:rows, :, width - keep: width] = old[:, :, mine - keep:]
            room[rows:, :, : width - theirs] = 0
            room[rows:, :, width - theirs: width] = new
            rooms.append(room)
        self._room = (rooms[0], rooms[1])
        self.keys, self.values = (room[:, :, :width] for room in self._room)


class ReservedCache(Cache):
    """A cache of `ReservedLayer`s, one per decoder layer as the model first writes to it."""

    def __init__(self, capacity: int):
        super().__init__(layer_class_to_replicate=lambda: ReservedLayer(capacity))

    def join(self, other: "ReservedCache", keep: int, capacity: int) -> None:
        """`ReservedLayer.join` at every layer: `other`'s rows come after this cache's."""
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            mine.join(theirs, keep, capacity)
