"""The prefix cache of the continuous engine: prompts that start alike are prefilled once.

A prompt is cut into blocks of ``BLOCK_TOKENS`` tokens; each full block is named by a hash of
everything before and in it (a chain: block i's key hashes block i-1's key and block i's
tokens), under a namespace (the row's adapter: a LoRA adapter changes the keys and values of
every layer). The cache keeps, per block key, that block's keys and values of every layer
([H, BLOCK_TOKENS, D] each); a joining row reuses the longest run of its leading blocks found
and prefills only the rest. RoPE is applied before caching, which is right because a row's own
positions always start at 0 (left padding never shifts them).

Bounded by bytes (``FARM_PREFIX_CACHE_MB``), least recently used first out. Only the model
thread touches it. The block keys and the LRU bookkeeping are pure; tensors are only stored.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BLOCK_TOKENS = 64
"""Tokens per cached block: a prefix is reused in whole blocks."""

LayerKV = tuple[Any, Any]
"""One layer's keys and values of one block, each [H, BLOCK_TOKENS, D]."""
BlockKV = list[LayerKV]
"""One block of every layer."""


def block_keys(ids: Sequence[int], namespace: str, block: int = BLOCK_TOKENS) -> list[bytes]:
    """The chained key of each full block of ``ids`` (a trailing partial block has none)."""
    keys: list[bytes] = []
    previous = namespace.encode()
    for start in range(0, len(ids) - block + 1, block):
        previous = hashlib.blake2b(previous + array("q", ids[start:start + block]).tobytes(),
                                   digest_size=16).digest()
        keys.append(previous)
    return keys


def reusable_blocks(prompt_tokens: int, block: int = BLOCK_TOKENS) -> int:
    """Most blocks a prompt may take from the cache: its last token is always prefilled (its
    logits give the first new token)."""
    return max(0, prompt_tokens - 1) // block


@dataclass
class CacheStats:
    lookups: int = 0
    hit_tokens: int = 0
    """Prompt tokens taken from the cache instead of prefilled."""
    stored_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    """Blocks of keys and values by block key, least recently used evicted past ``budget_bytes``."""

    def __init__(self, budget_bytes: int, block: int = BLOCK_TOKENS) -> None:
        self.budget_bytes, self.block = budget_bytes, block
        self.used_bytes = 0
        self.stats = CacheStats()
        self._blocks: OrderedDict[bytes, tuple[BlockKV, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def match(self, keys: Sequence[bytes], limit: int) -> list[BlockKV]:
        """The cached leading run of ``keys`` (at most ``limit`` blocks), each block's layers;
        the blocks found become the most recently used."""
        found: list[BlockKV] = []
        for key in keys[:limit]:
            entry = self._blocks.get(key)
            if entry is None:
                break
            self._blocks.move_to_end(key)
            found.append(entry[0])
        self.stats.lookups += 1
        self.stats.hit_tokens += len(found) * self.block
        return found

    def store(self, key: bytes, layers: BlockKV) -> None:
        """Keep one block (its tensors must not be views of a batch's cache); evicts the least
        recently used blocks to stay within the budget. A block over the whole budget is not kept."""
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if size > self.budget_bytes:
            return
        while self.used_bytes + size > self.budget_bytes:
            _, (_, freed) = self._blocks.popitem(last=False)
            self.used_bytes -= freed
            self.stats.evicted_blocks += 1
        self._blocks[key] = (layers, size)
        self.used_bytes += size
        self.stats.stored_blocks += 1

    def clear(self) -> None:
        self._blocks.clear()
        self.used_bytes = 0


def prefix_cache_off_reason(quant: str, budget_mb: float) -> str | None:
    """Why the engine runs without a prefix cache, or ``None`` when it uses one. Quantized models
    go without: LLM.int8 quantizes activations by what else is in the batch, so keys and values
    computed in another batch need not equal the ones a prefill would compute now."""
    if budget_mb <= 0:
        return "FARM_PREFIX_CACHE_MB is 0"
    if quant != "none":
        return f"quantized model ({quant})"
    return None
