"""Packed prefill: joiners' prompts run end to end in a few sequences (bins), without left padding.

A left-padded prefill of N prompts computes N × (longest prompt) tokens: for 15 prompts of 11-53
tokens (448 real tokens in 795 columns) the bench model took 600-740 ms padded and ~350 ms packed
(docs/DESIGN.md, "Packed prefill"). Here the prompts (after each row's cached prefix blocks) are
laid end to end in ``bins`` rows, each prompt in the bin holding the fewest tokens so far (longest
first); a 4D attention mask lets each token see its own prompt's earlier tokens and its own cached
blocks, each distinct cached block held once (rows sharing a system prompt share its columns);
positions restart per prompt. After the forward the cache is gathered back into the running
batch's layout: one left-padded row per prompt, its tokens ending at the last column, and only the
prompts' last tokens go through the output layer. Every token sees exactly the keys it sees in a
padded prefill, so outputs are the same up to float rounding of the different matmul shapes, as
with any batching.

A dense mask costs attention over every pair of a bin's tokens, so one bin of many prompts pays
for pairs that are masked (64 prompts of the bench, 1,866 tokens: 3.3 s in one bin, 2.3 s in 8);
``plan_bins`` picks the number of bins that takes the fewest FLOPs, or none when the left-padded
layout takes fewer (many long prompts of equal length). Packed only when the model attends through
``sdpa`` (the only implementation taking a boolean 4D mask as it is) with no sliding-window layer.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.prefix_cache import BLOCK_TOKENS, BlockKV


@dataclass(frozen=True)
class Costs:
    """FLOPs of one token through the weights, and of one (query, key) pair through attention."""

    token: float
    pair: float

    @classmethod
    def of(cls, model: Any, config: Any) -> Costs:
        heads = getattr(config, "num_attention_heads", 1)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = getattr(config, "num_hidden_layers", 1)
        params = sum(p.numel() for p in model.parameters())
        return cls(token=2.0 * params, pair=4.0 * heads * head_dim * layers)


def plan_bins(costs: Costs, new: list[int], past: list[int], distinct_past: int) -> int:
    """The number of bins in which packing ``new`` tokens per row (after ``past`` cached tokens
    each, ``distinct_past`` of them distinct, which every bin holds) takes the fewest FLOPs; 0 when
    left padding them takes fewer. Tried: 1, 2, 3, 4, 6, 8, 12, ... bins below the row count (a
    few dozen at most: 64 rows plan in ~0.7 ms, 256 in ~2.6)."""
    width, past_width = max(new), max(past)
    best, fewest = 0, len(new) * (costs.token * width + costs.pair * width * (past_width + width))
    for bins in _bin_counts(len(new)):
        longest = max(_loads(new, assign(new, bins), bins))
        flops = bins * longest * (costs.token + costs.pair * (distinct_past + longest))
        if flops < fewest:
            best, fewest = bins, flops
    return best


def _bin_counts(rows: int) -> list[int]:
    counts, power = set(), 1
    while power < rows:
        counts |= {n for n in (power, power * 3 // 2) if n < rows}
        power *= 2
    return sorted(counts)


def assign(lengths: list[int], bins: int) -> list[int]:
    """Each row's bin: the longest rows first, each into the bin holding the fewest tokens so far
    (the lowest such bin)."""
    heap, where = [(0, b) for b in range(bins)], [0] * len(lengths)
    for row in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        load, where[row] = heapq.heappop(heap)
        heapq.heappush(heap, (load + lengths[row], where[row]))
    return where


def _loads(lengths: list[int], where: list[int], bins: int) -> list[int]:
    """Tokens per bin of the assignment ``where``."""
    loads = [0] * bins
    for length, b in zip(lengths, where, strict=True):
        loads[b] += length
    return loads


@dataclass
class Packed:
    """The inputs of a packed prefill and the way back to the batch's layout."""

    ids: torch.Tensor
    """[G, T]: each bin's rows' new tokens, end to end (a short bin ends in padding)."""
    positions: torch.Tensor
    """[G, T]"""
    mask: torch.Tensor
    """[G, 1, T, P + T] bool: True where a token may attend (padding sees only itself)."""
    past: list[tuple[torch.Tensor, torch.Tensor]] | None
    """Per layer keys and values [G, H, P, D] (one copy, expanded) of the distinct cached blocks;
    ``None`` when P = 0."""
    last: torch.Tensor
    """[N]: where each row's last token lies in ``ids`` flattened (its logits give its first token)."""
    bins: torch.Tensor
    """[N]: each row's bin."""
    gather: torch.Tensor
    """[N, W]: for each row, the cache columns of its tokens in its bin, right-aligned (left padding
    takes column 0, masked)."""
    row_mask: torch.Tensor
    """[N, W]: 1 for each row's tokens, 0 for its left padding."""


def pack(prompts: list[list[int]], cached: list[list[tuple[bytes, BlockKV]]], device: Any,
         bins: int = 1) -> Packed:
    """The packed prefill of ``prompts`` (whole prompts) in ``bins`` bins, each prompt after its
    ``cached`` leading blocks (key and keys/values per layer)."""
    column: dict[bytes, int] = {}
    blocks: list[BlockKV] = []
    for row in cached:
        for key, block in row:
            if key not in column:
                column[key] = len(blocks) * BLOCK_TOKENS
                blocks.append(block)
    past_width = len(blocks) * BLOCK_TOKENS
    news = [prompt[len(row) * BLOCK_TOKENS:] for prompt, row in zip(prompts, cached, strict=True)]
    lengths = [len(n) for n in news]
    where = assign(lengths, bins)
    total, width = max(_loads(lengths, where, bins)), max(len(p) for p in prompts)
    ids = torch.zeros(bins, total, dtype=torch.long)
    positions = torch.zeros(bins, total, dtype=torch.long)
    mask = torch.zeros(bins, total, past_width + total, dtype=torch.bool)
    gather = torch.zeros(len(prompts), width, dtype=torch.long)
    row_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    last: list[int] = []
    starts = [0] * bins
    for i, (new, row) in enumerate(zip(news, cached, strict=True)):
        length, done, b = len(new), len(row) * BLOCK_TOKENS, where[i]
        start = starts[b]
        span = slice(start, start + length)
        own = [column[key] + j for key, _ in row for j in range(BLOCK_TOKENS)]
        mask[b, span, own] = True
        mask[b, span, past_width + start:past_width + start + length] = torch.ones(
            length, length, dtype=torch.bool).tril()
        columns = own + list(range(past_width + start, past_width + start + length))
        gather[i, width - len(columns):] = torch.tensor(columns)
        row_mask[i, width - len(columns):] = 1
        ids[b, span] = torch.tensor(new)
        positions[b, span] = torch.arange(done, done + length)
        starts[b] = start + length
        last.append(b * total + start + length - 1)
    for b, end in enumerate(starts):  # a bin's padding attends to itself (a query seeing nothing gives NaN)
        pads = torch.arange(end, total)
        mask[b, pads, past_width + pads] = True
    past = None
    if blocks:
        def every_bin(layer: int, part: int) -> torch.Tensor:
            return torch.cat([b[layer][part] for b in blocks], dim=1)[None].expand(bins, -1, -1, -1)

        past = [(every_bin(layer, 0), every_bin(layer, 1)) for layer in range(len(blocks[0]))]
    return Packed(ids.to(device), positions.to(device), mask[:, None].to(device), past,
                  torch.tensor(last, device=device), torch.tensor(where, device=device), gather.to(device),
                  row_mask.to(device))


def unpack(packed: Packed, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's packed cache [G, H, P + T, D] as the batch's rows [N, H, W, D] (views of one
    gathered copy each, laid out [N, W, H, D])."""
    return _rows(keys, packed), _rows(values, packed)


def _rows(tensor: torch.Tensor, packed: Packed) -> torch.Tensor:
    rows, width = packed.gather.shape
    picked = tensor[packed.bins.repeat_interleave(width), :, packed.gather.flatten()]  # [N * W, H, D]
    return picked.view(rows, width, *picked.shape[1:]).permute(0, 2, 1, 3)


def last_rows(head: torch.nn.Module, last: torch.Tensor) -> Any:
    """A hook on the output layer ``head`` that passes it only the hidden states at ``last`` (of
    the input flattened): [1, N, hidden], so that the logits are [1, N, vocabulary]. Returns the
    hook's handle (``remove()`` it after the forward)."""

    def keep(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, last)[None], *args[1:])

    return head.register_forward_pre_hook(keep)
