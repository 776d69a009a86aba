"""The running batch of continuous batching (``runner.RunningBatch`` on torch): rows join and
leave at every decode step, so a short request is never held behind a long one.

Built on the model's own KV cache rather than transformers' ``generate_batch``: that API has no
per-row LoRA adapter, no per-row seeded sampling and no stop-string hook, and measured slower than
a plain left-padded batch on this CPU. Here the running batch is one left-padded
``DynamicCache``; joiners are prefilled together and their cache is padded and concatenated in;
each decode step feeds one token per row with its own position; finished rows are cut out. Every
row sees exactly what plain ``generate`` shows it (its tokens, its positions, padding masked), so
greedy fp32 outputs are the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from worker.engine.model_runner import ModelRunner
from worker.engine.runner import BatchRow, StepObserver, advance_rows
from worker.engine.sampling import RowSampler


@dataclass
class _Block:
    """Rows with their KV cache: the running batch, or joiners just prefilled."""

    rows: list[BatchRow]
    cache: Any
    """``DynamicCache``; per layer keys/values [B, H, S, D], left-padded."""
    mask: torch.Tensor
    """[B, S]: 1 for real tokens (prompt and generated), 0 for left padding."""
    last: torch.Tensor
    """[B]: the token each row feeds at the next step."""


class ContinuousBatch:
    """The running batch on one model. Only the engine's model thread calls it."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.block: _Block | None = None

    @property
    def rows(self) -> list[BatchRow]:
        return self.block.rows if self.block else []

    def join(self, rows: list[BatchRow], observer: StepObserver) -> None:
        """Prefill ``rows``, stream their first token and add them to the batch (rows already
        done leave at the next ``evict``)."""
        self.runner.check_faults(rows)
        ids, mask = self.runner.left_pad([row.input_ids for row in rows])  # [N, S]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits, cache = self._forward(rows, ids, mask, positions, None)
        tokens = self._advance(rows, logits, observer)
        self.block = _merge(self.block, _Block(rows, cache, mask, tokens))

    def step(self, observer: StepObserver) -> None:
        """One decode step: one new token for every running row."""
        block = self.block
        if block is None:
            return
        self.runner.check_faults(block.rows)
        mask = torch.cat([block.mask, block.mask.new_ones((len(block.rows), 1))], dim=-1)  # [B, S+1]
        positions = mask.sum(-1, keepdim=True) - 1  # [B, 1]: each row's own position
        logits, block.cache = self._forward(block.rows, block.last[:, None], mask, positions, block.cache)
        block.mask = mask
        block.last = self._advance(block.rows, logits, observer)

    def evict(self) -> list[BatchRow]:
        """Cut finished rows out of the batch; returns them."""
        block = self.block
        if block is None:
            return []
        done = [row for row in block.rows if row.state.done]
        if done:
            keep = [i for i, row in enumerate(block.rows) if not row.state.done]
            self.block = _trim(_select(block, keep)) if keep else None
        return done

    def drop(self) -> list[BatchRow]:
        """Empty the batch (after a failed step); returns the rows that were in it."""
        rows, self.block = self.rows, None
        return rows

    def _forward(self, rows: list[BatchRow], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any) -> tuple[torch.Tensor, Any]:
        model = self.runner.loaded.model
        cache = cache if cache is not None else _slab_cache(_base_config(model))
        with torch.inference_mode(), self.runner.adapters(rows) as adapter_kwargs:
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                        use_cache=True, logits_to_keep=1, **adapter_kwargs)
        # generate's own cast: scores in float32, copied out of the model's buffer.
        return out.logits[:, -1, :].to(copy=True, dtype=torch.float32), out.cache  # [B, V]

    def _advance(self, rows: list[BatchRow], logits: torch.Tensor, observer: StepObserver) -> torch.Tensor:
        """Pick each row's token (greedy or its own sampler), push it, stream; returns [B]."""
        scores = RowSampler(rows)(None, logits)  # type: ignore[arg-type]
        tokens = scores.argmax(dim=-1)  # [B]
        advance_rows(rows, tokens.tolist(), self.runner.decode, observer, time.monotonic())
        return tokens


class _SlabLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of buffers with spare columns.

    ``DynamicLayer`` appends by ``torch.cat``, copying the whole cache at every step (for 16 rows
    of the 100M model, ~120 MB per step); here a step writes its column in place. Keys/values
    replaced from outside (rows cut out or merged) are copied into fresh buffers at the next step.
    """

    SPARE = 64

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        used, new = self.keys.shape[-2], key_states.shape[-2]
        buffers = getattr(self, "_buffers", None)
        if buffers is None or self.keys is not getattr(self, "_view", None) or used + new > buffers[0].shape[-2]:
            buffers = self._reserve(used + new + self.SPARE)
        buffers[0][:, :, used:used + new] = key_states
        buffers[1][:, :, used:used + new] = value_states
        self.keys, self.values = buffers[0][:, :, :used + new], buffers[1][:, :, :used + new]
        self._view = self.keys
        return self.keys, self.values

    def _reserve(self, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        self._buffers = (_widened(self.keys, columns), _widened(self.values, columns))
        return self._buffers


def _widened(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """A copy of ``tensor`` [B, H, S, D] in a buffer of ``columns`` >= S columns."""
    shape = list(tensor.shape)
    shape[-2] = columns
    buffer = tensor.new_zeros(shape)
    buffer[:, :, :tensor.shape[-2]] = tensor
    return buffer


def _slab_cache(config: Any) -> Any:
    """A ``DynamicCache`` whose full-attention layers grow in place (sliding layers left as they are)."""
    cache = DynamicCache(config=config)
    cache.layers = [_SlabLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _base_config(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def _layers(cache: Any) -> list[Any]:
    layers = list(getattr(cache, "layers", []))
    if not layers or any(not hasattr(layer, "keys") for layer in layers):
        raise RuntimeError("continuous batching needs a DynamicCache with per-layer keys/values")
    return layers


def _select(block: _Block, keep: list[int]) -> _Block:
    index = torch.tensor(keep, device=block.mask.device)
    for layer in _layers(block.cache):
        layer.keys, layer.values = layer.keys[index], layer.values[index]
    return _Block([block.rows[i] for i in keep], block.cache, block.mask[index], block.last[index])


def _trim(block: _Block) -> _Block:
    """Drop left columns that are padding in every remaining row (a long row just left)."""
    first = int(block.mask.any(dim=0).nonzero()[0])
    if first == 0:
        return block
    for layer in _layers(block.cache):
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    block.mask = block.mask[:, first:]
    return block


def _merge(running: _Block | None, joined: _Block) -> _Block:
    """One block of both: the shorter is padded on the left, then rows are stacked."""
    if running is None:
        return joined
    width = max(running.mask.shape[1], joined.mask.shape[1])
    for old, new in zip(_layers(running.cache), _layers(joined.cache), strict=True):
        old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)])
        old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)])
    mask = torch.cat([_pad_left(running.mask, width, 1), _pad_left(joined.mask, width, 1)])
    return _Block(running.rows + joined.rows, running.cache, mask, torch.cat([running.last, joined.last]))


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
