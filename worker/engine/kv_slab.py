"""The running batch of continuous batching (``runner.RunningBatch`` on torch): rows join and
leave at every decode step, so a short request is never held behind a long one.

Built on the model's own KV cache rather than transformers' ``generate_batch``: that API has no
per-row LoRA adapter, no per-row seeded sampling and no stop-string hook, and measured slower than
a plain left-padded batch on this CPU. Here the running batch is one left-padded
``DynamicCache``; joiners are prefilled together and their cache is padded and concatenated in;
each decode step feeds one token per row with its own position; finished rows are cut out. Every
row sees exactly what plain ``generate`` shows it (its tokens, its positions, padding masked), so
greedy fp32 outputs are the same. With a ``PrefixCache``, a joiner's leading blocks that an
earlier prompt prefilled come from the cache and only the rest is prefilled (docs/DESIGN.md).

Chunked prefill (``FARM_PREFILL_CHUNK_TOKENS``): joiners that arrive while rows run are prefilled
a few columns at a time, at most that many tokens (rows × columns) per decode step, so that the
running rows keep their pace while a long prompt joins; they join the batch when their last chunk
is done. An idle batch prefills its joiners at once (nobody would wait for it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from worker.decode_attention import sdpa_like
from worker.engine.model_runner import ModelRunner
from worker.engine.packed_prefill import Costs, last_rows, pack, plan_bins, unpack
from worker.engine.prefix_cache import BLOCK_TOKENS, BlockKV, PrefixCache, block_keys, reusable_blocks
from worker.engine.runner import BatchRow, StepObserver, advance_rows
from worker.engine.sampling import RowSampler
from worker.engine.slab_layer import SlabLayer, cacheable, slab_cache, stacked

log = logging.getLogger(__name__)


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


@dataclass
class _Filling:
    """Joiners whose prefill runs in chunks between decode steps."""

    rows: list[BatchRow]
    ids: torch.Tensor
    """[N, S]: what is prefilled (after each row's cached blocks), left-padded."""
    mask: torch.Tensor
    """[N, P+S]: the whole mask, the cached blocks' P columns first."""
    positions: torch.Tensor
    """[N, S]"""
    cache: Any
    cached: list[int]
    """Blocks each row took from the prefix cache."""
    chunk_tokens: int
    """Most tokens per chunk while rows run (0: all at once)."""
    done: int = 0
    """Columns of ``ids`` prefilled so far."""


class ContinuousBatch:
    """The running batch on one model. Only the engine's model thread calls it."""

    def __init__(self, runner: ModelRunner, prefix: PrefixCache | None = None, chunk_tokens: int = 0,
                 packed_prefill: bool = True) -> None:
        self.runner = runner
        self.chunk_tokens = chunk_tokens
        """Most prefill tokens per decode step while rows run; 0: joiners are prefilled at once."""
        self.filling: _Filling | None = None
        self.config = _base_config(runner.loaded.model)
        self.prefix = prefix if prefix is not None and cacheable(self.config) else None
        if prefix is not None and self.prefix is None:
            log.info("prefix cache off: the model has sliding-window layers")
        packs = (packed_prefill and cacheable(self.config) and sdpa_like(self.config)
                 and runner.loaded.model.get_output_embeddings() is not None)
        self.costs = Costs.of(runner.loaded.model, self.config) if packs else None
        """Set when joiners may be prefilled packed (``packed_prefill.py``)."""
        self.packed_prefills = 0
        self.packed_bins = 0
        """The most bins a packed prefill has used."""
        self.block: _Block | None = None

    @property
    def rows(self) -> list[BatchRow]:
        """The running rows, and joiners still being prefilled."""
        return (self.block.rows if self.block else []) + (self.filling.rows if self.filling else [])

    @property
    def joining(self) -> bool:
        """Whether a chunked prefill is under way (new joiners wait for its end)."""
        return self.filling is not None

    def join(self, rows: list[BatchRow], observer: StepObserver) -> None:
        """Prefill ``rows``, stream their first token and add them to the batch (rows already
        done leave at the next ``evict``). Joiners that share blocks no cache holds yet: one of
        them is prefilled first, so that the others find those blocks cached."""
        self.runner.check_faults(rows)
        self._join_sharing(rows, observer, self.chunk_tokens)

    def _join_sharing(self, rows: list[BatchRow], observer: StepObserver, chunk_tokens: int) -> None:
        lead = self._leader(rows)
        if lead is None:
            self._join(rows, observer, chunk_tokens)
            return
        # The others need the lead's blocks cached: its prefill is not chunked (nor theirs, which
        # the cache makes short).
        self._join([lead], observer, 0)
        rest = [row for row in rows if row is not lead]
        try:  # a cache too small to keep the lead's blocks: the others go together, as without one
            (self._join_sharing if self._all_cached(lead) else self._join)(rest, observer, 0)
        except Exception:
            self._discard(lead)  # the core retries every joiner, this one too
            raise

    def _join(self, rows: list[BatchRow], observer: StepObserver, chunk_tokens: int) -> None:
        if self.filling is not None:
            raise RuntimeError("rows joined during a chunked prefill")  # the strategy waits for it
        cached = [self._cached_blocks(row) for row in rows]
        bins = self._bins(rows, cached, chunk_tokens)
        if bins:
            self._fill_packed(rows, cached, observer, bins)
            return
        blocks = [[block for _, block in row_blocks] for row_blocks in cached]
        filling = _Filling(rows, *self._prefill_inputs(rows, blocks), [len(b) for b in blocks], chunk_tokens)
        self.filling = filling
        try:
            self._fill(filling, observer)
        except Exception:
            self.filling = None  # the core retries these rows (drop() is not asked after a failed join)
            raise

    def _fill(self, filling: _Filling, observer: StepObserver) -> None:
        """Prefill the next chunk of ``filling`` (all of it when no row runs); after the last
        chunk its rows stream their first token and join the batch."""
        width = filling.ids.shape[1]
        chunk = width - filling.done
        if self.block is not None and filling.chunk_tokens > 0:
            chunk = min(chunk, max(1, filling.chunk_tokens // len(filling.rows)))
        end, past = filling.done + chunk, filling.mask.shape[1] - width
        logits, filling.cache = self._forward(filling.rows, filling.ids[:, filling.done:end],
                                              filling.mask[:, :past + end], filling.positions[:, filling.done:end],
                                              filling.cache)
        filling.done = end
        if end < width:
            return
        self.filling = None
        self._joined(filling.rows, filling.cached, filling.cache, filling.mask, logits, observer)

    def _joined(self, rows: list[BatchRow], cached: list[int], cache: Any, mask: torch.Tensor,
                logits: torch.Tensor, observer: StepObserver) -> None:
        """Prefilled ``rows`` (``cached`` blocks each from the prefix cache, their cache and mask in
        the batch's layout) keep their new blocks, stream their first token and join the batch."""
        if self.prefix is not None:
            self._keep_blocks(rows, cached, cache, mask.shape[1])
        tokens = self._advance(rows, logits, observer)
        self.block = _merge(self.block, _Block(rows, cache, mask, tokens))

    def _bins(self, rows: list[BatchRow], cached: list[list[tuple[bytes, BlockKV]]], chunk_tokens: int) -> int:
        """In how many packed sequences ``rows`` are prefilled (0: left-padded): several rows of
        one adapter (peft routes mixed adapters per batch row), not to be chunked, in the layout
        of fewest FLOPs."""
        if self.costs is None or len(rows) < 2 or len({row.adapter for row in rows}) > 1:
            return 0
        past = [len(blocks) * BLOCK_TOKENS for blocks in cached]
        new = [len(row.input_ids) - n for row, n in zip(rows, past, strict=True)]
        if self.block is not None and 0 < chunk_tokens < sum(new):
            return 0  # rows run: the padded prefill goes in chunks between their steps
        distinct = {key for row_blocks in cached for key, _ in row_blocks}
        return plan_bins(self.costs, new, past, len(distinct) * BLOCK_TOKENS)

    def _fill_packed(self, rows: list[BatchRow], cached: list[list[tuple[bytes, BlockKV]]],
                     observer: StepObserver, bins: int) -> None:
        """Prefill ``rows`` packed in ``bins`` sequences, stream their first token, add them to the batch."""
        packed = pack([row.input_ids for row in rows], cached, self.runner.loaded.device, bins)
        cache = slab_cache(self.config)
        for layer, past in zip(cache.layers, packed.past or [], strict=False):
            layer.update(*past)
        logits, cache = self._forward(rows, packed.ids, packed.mask, packed.positions, cache, packed.last)
        for layer in _layers(cache):
            layer.keys, layer.values = unpack(packed, layer.keys, layer.values)
        self.packed_prefills, self.packed_bins = self.packed_prefills + 1, max(self.packed_bins, bins)
        self._joined(rows, [len(row_blocks) for row_blocks in cached], cache, packed.row_mask, logits, observer)

    def _prefill_inputs(self, rows: list[BatchRow], cached: list[list[BlockKV]]) -> tuple[Any, ...]:
        """Inputs of a prefill after each row's cached blocks: ids [N, S] of the rest, left-padded;
        mask [N, P+S] and the cache holding the cached blocks in P columns (each row's right-aligned,
        so that a row reads [pad, cached, pad, rest]; padding is masked); positions [N, S]."""
        done = [len(blocks) * BLOCK_TOKENS for blocks in cached]
        ids, mask = self.runner.left_pad([row.input_ids[n:] for row, n in zip(rows, done, strict=True)])
        offset = torch.tensor(done, device=mask.device)[:, None]
        positions = (mask.cumsum(-1) - 1 + offset).masked_fill(mask == 0, 0)
        width = max(done)
        if width == 0:
            return ids, mask, positions, None
        past = torch.tensor([[0] * (width - n) + [1] * n for n in done], device=mask.device, dtype=mask.dtype)
        cache = slab_cache(self.config)
        for index, layer in enumerate(cache.layers):
            layer.update(*_cached_layer(cached, index, width))
        return ids, torch.cat([past, mask], dim=-1), positions, cache

    def _cached_blocks(self, row: BatchRow) -> list[tuple[bytes, BlockKV]]:
        """The row's leading blocks the prefix cache holds, with their keys."""
        if self.prefix is None:
            return []
        keys = self._keys(row)
        return list(zip(keys, self.prefix.match(keys, reusable_blocks(len(row.input_ids))), strict=False))

    def _keys(self, row: BatchRow) -> list[bytes]:
        return block_keys(row.input_ids, row.adapter)

    def _keep_blocks(self, rows: list[BatchRow], cached: list[int], cache: Any, width: int) -> None:
        """Copy each row's newly prefilled full blocks into the prefix cache (token t of a row of
        length L sits in column width - L + t: rows end at the last column)."""
        assert self.prefix is not None
        layers = _layers(cache)
        for i, row in enumerate(rows):
            keys, length = self._keys(row), len(row.input_ids)
            for b in range(cached[i], len(keys)):
                if keys[b] in self.prefix:
                    continue
                start = width - length + b * BLOCK_TOKENS
                columns = slice(start, start + BLOCK_TOKENS)
                self.prefix.store(keys[b], [(layer.keys[i, :, columns].clone(), layer.values[i, :, columns].clone())
                                            for layer in layers])

    def _leader(self, rows: list[BatchRow]) -> BatchRow | None:
        """The first joiner with a block that another joiner shares and the cache lacks."""
        if self.prefix is None or len(rows) < 2:
            return None
        owners: dict[bytes, BatchRow] = {}
        for row in rows:
            for key in self._keys(row)[:reusable_blocks(len(row.input_ids))]:
                if key in self.prefix:
                    continue
                if key in owners and owners[key] is not row:
                    return owners[key]
                owners.setdefault(key, row)
        return None

    def _all_cached(self, row: BatchRow) -> bool:
        assert self.prefix is not None
        return all(key in self.prefix for key in self._keys(row)[:reusable_blocks(len(row.input_ids))])

    def _discard(self, row: BatchRow) -> None:
        block = self.block
        if block is not None:
            keep = [i for i, other in enumerate(block.rows) if other is not row]
            self.block = _trim(_select(block, keep)) if keep else None

    def step(self, observer: StepObserver) -> None:
        """One decode step: one new token for every running row; then the next prefill chunk of
        the joiners, if any."""
        filling = self.filling
        self._decode(observer)
        if filling is not None:
            self._fill(filling, observer)

    def _decode(self, observer: StepObserver) -> None:
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
        rows, self.block, self.filling = self.rows, None, None
        return rows

    def _forward(self, rows: list[BatchRow], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any, last: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """The rows' next-token logits [B, V]: at each row's last column, or at the places ``last``
        of a packed input flattened (only those go through the output layer)."""
        model = self.runner.loaded.model
        cache = cache if cache is not None else slab_cache(self.config)
        hook = None if last is None else last_rows(model.get_output_embeddings(), last)
        try:
            with torch.inference_mode(), self.runner.adapters(rows) as adapter_kwargs:
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, logits_to_keep=1 if last is None else 0, **adapter_kwargs)
        finally:
            if hook is not None:
                hook.remove()
        logits = out.logits[:, -1, :] if last is None else out.logits[0]
        # generate's own cast: scores in float32, copied out of the model's buffer.
        return logits.to(copy=True, dtype=torch.float32), out.cache

    def _advance(self, rows: list[BatchRow], logits: torch.Tensor, observer: StepObserver) -> torch.Tensor:
        """Pick each row's token (greedy or its own sampler), push it, stream; returns [B]."""
        scores = RowSampler(rows)(None, logits)  # type: ignore[arg-type]
        tokens = scores.argmax(dim=-1)  # [B]
        advance_rows(rows, tokens.tolist(), self.runner.decode, observer, time.monotonic())
        return tokens


def _base_config(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def _layers(cache: Any) -> list[Any]:
    layers = list(getattr(cache, "layers", []))
    if not layers or any(not hasattr(layer, "keys") for layer in layers):
        raise RuntimeError("continuous batching needs a DynamicCache with per-layer keys/values")
    return layers


def _select(block: _Block, keep: list[int]) -> _Block:
    """The block of the rows at ``keep``: each leaving row's place among the first ``len(keep)``
    is taken by a kept row from behind them, and the batch is cut to ``len(keep)`` rows. A slab
    layer does that in its own buffers, copying only the rows that move (when 1 of 16 rows of the
    bench model left, a gather of the 15 others took 84 ms, two decode steps); other layers gather.
    The rows' order changes; ``rows``, ``mask`` and ``last`` follow it."""
    kept, size = set(keep), len(keep)
    movers = iter(i for i in keep if i >= size)
    order = [i if i in kept else next(movers) for i in range(size)]
    index = torch.tensor(order, device=block.mask.device)
    for layer in _layers(block.cache):
        if not (isinstance(layer, SlabLayer) and layer.move_rows(order)):
            layer.keys, layer.values = layer.keys[index], layer.values[index]
    return _Block([block.rows[i] for i in order], block.cache, block.mask[index], block.last[index])


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
    """One block of both: the shorter is padded on the left, then rows are stacked, into a slab
    layer's buffers with its spare columns (so the next step writes in place, copying nothing)."""
    if running is None:
        for layer in _layers(joined.cache):
            if isinstance(layer, SlabLayer) and not layer.owns_buffers:
                layer.stack_in([layer], joined.mask.shape[1])
        return joined
    width = max(running.mask.shape[1], joined.mask.shape[1])
    for old, new in zip(_layers(running.cache), _layers(joined.cache), strict=True):
        if isinstance(old, SlabLayer):
            old.stack_in([old, new], width)
        else:
            old.keys = stacked([old.keys, new.keys], width, width)
            old.values = stacked([old.values, new.values], width, width)
    mask = torch.cat([_pad_left(running.mask, width, 1), _pad_left(joined.mask, width, 1)])
    return _Block(running.rows + joined.rows, running.cache, mask, torch.cat([running.last, joined.last]))


def _cached_layer(cached: list[list[BlockKV]], layer: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's keys and values [N, H, width, D] of each row's cached blocks, right-aligned on zeros."""
    sample = next(blocks[0][layer][0] for blocks in cached if blocks)  # [H, BLOCK, D]

    def rows(part: int) -> list[torch.Tensor]:
        return [torch.cat([block[layer][part] for block in blocks], dim=1)[None] if blocks
                else sample.new_empty((1, sample.shape[0], 0, sample.shape[2])) for blocks in cached]

    return stacked(rows(0), width, width), stacked(rows(1), width, width)


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
