"""Packed prefill: joiners' prompts run as one sequence, without left padding.

A left-padded prefill of N prompts computes N × (longest prompt) tokens: for 15 prompts of 11-53
tokens (448 real tokens in 795 columns) the bench model took 600-740 ms padded and ~350 ms packed
(docs/DESIGN.md, "Packed prefill"). Here the prompts (after each row's cached prefix blocks) are
laid end to end in one row; a 4D attention mask lets each token see its own prompt's earlier
tokens and its own cached blocks, each distinct cached block held once (rows sharing a system
prompt share its columns); positions restart per prompt. After the forward the cache is gathered
back into the running batch's layout: one left-padded row per prompt, its tokens ending at the
last column. Every token sees exactly the keys it sees in a padded prefill, so outputs are the same
up to float rounding of the different matmul shapes, as with any batching.

A dense mask costs attention over every pair of the packed tokens, so ``ContinuousBatch._packs``
packs only when ``cheaper`` finds the packed layout takes fewer FLOPs than the padded one (short,
unequal prompts: yes; many long ones: no) and the model attends through ``sdpa`` (the only
implementation taking a boolean 4D mask as it is) with no sliding-window layer.
"""

from __future__ import annotations

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


def cheaper(costs: Costs, new: list[int], past: list[int], distinct_past: int) -> bool:
    """Whether packing ``new`` tokens per row (after ``past`` cached tokens each, ``distinct_past``
    of them distinct) takes fewer FLOPs than left padding them."""
    total, width, past_width = sum(new), max(new), max(past)
    packed = costs.token * total + costs.pair * total * (distinct_past + total)
    padded = len(new) * (costs.token * width + costs.pair * width * (past_width + width))
    return packed < padded


@dataclass
class Packed:
    """The inputs of a packed prefill and the way back to the batch's layout."""

    ids: torch.Tensor
    """[1, T]: every row's new tokens, end to end."""
    positions: torch.Tensor
    """[1, T]"""
    mask: torch.Tensor
    """[1, 1, T, P + T] bool: True where a token may attend."""
    past: list[tuple[torch.Tensor, torch.Tensor]] | None
    """Per layer keys and values [1, H, P, D] of the distinct cached blocks; ``None`` when P = 0."""
    last: torch.Tensor
    """[N]: the column of each row's last token in ``ids`` (its logits give its first token)."""
    gather: torch.Tensor
    """[N, W]: for each row, the packed cache columns of its tokens, right-aligned (left padding
    takes column 0, masked)."""
    row_mask: torch.Tensor
    """[N, W]: 1 for each row's tokens, 0 for its left padding."""


def pack(prompts: list[list[int]], cached: list[list[tuple[bytes, BlockKV]]], device: Any) -> Packed:
    """The packed prefill of ``prompts`` (whole prompts), each after its ``cached`` leading blocks
    (key and keys/values per layer)."""
    column: dict[bytes, int] = {}
    blocks: list[BlockKV] = []
    for row in cached:
        for key, block in row:
            if key not in column:
                column[key] = len(blocks) * BLOCK_TOKENS
                blocks.append(block)
    past_width = len(blocks) * BLOCK_TOKENS
    news = [prompt[len(row) * BLOCK_TOKENS:] for prompt, row in zip(prompts, cached, strict=True)]
    total, width = sum(len(n) for n in news), max(len(p) for p in prompts)
    mask = torch.zeros(total, past_width + total, dtype=torch.bool)
    gather = torch.zeros(len(prompts), width, dtype=torch.long)
    row_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    positions: list[int] = []
    last: list[int] = []
    start = 0
    for i, (new, row) in enumerate(zip(news, cached, strict=True)):
        length, done = len(new), len(row) * BLOCK_TOKENS
        span = slice(start, start + length)
        own = [column[key] + j for key, _ in row for j in range(BLOCK_TOKENS)]
        mask[span, own] = True
        mask[span, past_width + start:past_width + start + length] = torch.ones(
            length, length, dtype=torch.bool).tril()
        columns = own + list(range(past_width + start, past_width + start + length))
        gather[i, width - len(columns):] = torch.tensor(columns)
        row_mask[i, width - len(columns):] = 1
        positions.extend(range(done, done + length))
        start += length
        last.append(start - 1)
    past = None
    if blocks:
        layers = len(blocks[0])
        past = [(torch.cat([b[layer][0] for b in blocks], dim=1)[None],
                 torch.cat([b[layer][1] for b in blocks], dim=1)[None]) for layer in range(layers)]
    ids = torch.tensor([[t for new in news for t in new]], device=device)
    return Packed(ids, torch.tensor([positions], device=device), mask[None, None].to(device), past,
                  torch.tensor(last, device=device), gather.to(device), row_mask.to(device))


def unpack(packed: Packed, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's packed cache [1, H, P + T, D] as the batch's rows [N, H, W, D] (views of one
    gathered copy each, laid out [N, W, H, D])."""
    return _rows(keys, packed.gather), _rows(values, packed.gather)


def _rows(tensor: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    rows, width = gather.shape
    columns = tensor[0].transpose(0, 1)  # [P + T, H, D]
    picked = columns.index_select(0, gather.flatten()).view(rows, width, *columns.shape[1:])
    return picked.permute(0, 2, 1, 3)

