"""The running batch's KV cache layer: keys and values in buffers with spare columns, written in
place at each decode step; rows move inside them and joins are stacked into them once
(``kv_slab.ContinuousBatch`` uses it)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class SlabLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of buffers with spare columns.

    ``DynamicLayer`` appends by ``torch.cat``, copying the whole cache at every step (for 16 rows
    of the 100M model, ~120 MB per step); here a step writes its column in place. Rows that leave
    move inside the buffers (``move_rows``) and joins are stacked into new ones once
    (``stack_in``); keys/values replaced from outside otherwise (a trim) are copied into fresh
    buffers at the next step.
    """

    SPARE = 64

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        used, new = self.keys.shape[-2], key_states.shape[-2]
        buffers = self._own_buffers()
        if buffers is None or used + new > buffers[0].shape[-2]:
            buffers = self._reserve(used + new + self.SPARE)
        buffers[0][:, :, used:used + new] = key_states
        buffers[1][:, :, used:used + new] = value_states
        self.keys, self.values = buffers[0][:, :, :used + new], buffers[1][:, :, :used + new]
        self._view = self.keys
        return self.keys, self.values

    def _own_buffers(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The buffers, while the keys are the view of them this layer made (``None`` otherwise)."""
        buffers = getattr(self, "_buffers", None)
        owned = buffers is not None and self.keys is not None and self.keys is getattr(self, "_view", None)
        return buffers if owned else None

    def move_rows(self, order: list[int]) -> bool:
        """Row ``i`` becomes row ``order[i]`` (rows kept in place copy nothing), in the buffers, cut
        to ``len(order)`` rows; ``False`` (nothing done) when the keys are not views of them."""
        buffers = self._own_buffers()
        if buffers is None:
            return False
        used, size = self.keys.shape[-2], len(order)
        with torch.inference_mode():  # the buffers are inference tensors (written in a forward)
            for row, source in enumerate(order):
                if source != row:
                    for buffer in buffers:
                        buffer[row, :, :used] = buffer[source, :, :used]
        self._buffers = (buffers[0][:size], buffers[1][:size])
        self.keys, self.values = self._buffers[0][:, :, :used], self._buffers[1][:, :, :used]
        self._view = self.keys
        return True

    def _reserve(self, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        self._buffers = (stacked([self.keys], columns), stacked([self.values], columns))
        return self._buffers

    @property
    def owns_buffers(self) -> bool:
        """Whether the keys are views of this layer's buffers (the next step then copies nothing)."""
        return self._own_buffers() is not None

    def stack_in(self, parts: list[Any], width: int) -> None:
        """The rows of ``parts`` (cache layers: this one, joiners') become this layer's rows, right-
        aligned at ``width`` columns, in new buffers with spare columns."""
        columns = width + self.SPARE
        self.adopt(stacked([part.keys for part in parts], columns, width),
                   stacked([part.values for part in parts], columns, width), width)

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, used: int) -> None:
        """Take ``keys``/``values`` [B, H, C, D] as the buffers, their first ``used`` columns in use."""
        self._buffers = (keys, values)
        self.keys, self.values = keys[:, :, :used], values[:, :, :used]
        self._view = self.keys


def stacked(parts: list[torch.Tensor], columns: int, width: int | None = None) -> torch.Tensor:
    """The rows of ``parts`` [Bi, H, Si, D] stacked in one buffer of ``columns`` columns, each
    part right-aligned at column ``width`` (default: the widest part) with zeros on its left; the
    columns beyond ``width`` are left unwritten (a slab layer writes each before it reads it).
    One allocation: every fresh buffer costs page faults (a 64-row join of the bench model
    spent ~0.6 s in each of two copies of its cache)."""
    width = width if width is not None else max(part.shape[2] for part in parts)
    first = parts[0]
    out = first.new_empty((sum(part.shape[0] for part in parts), first.shape[1], columns, first.shape[3]))
    row = 0
    for part in parts:
        rows, length = part.shape[0], part.shape[2]
        out[row:row + rows, :, :width - length] = 0
        out[row:row + rows, :, width - length:width] = part
        row += rows
    return out


def slab_cache(config: Any) -> Any:
    """A ``DynamicCache`` whose full-attention layers grow in place (sliding layers left as they are)."""
    cache = DynamicCache(config=config)
    cache.layers = [SlabLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def cacheable(config: Any) -> bool:
    """Whether every layer's cache is a plain full-attention one (a sliding window keeps no prefix)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)

