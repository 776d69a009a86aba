"""The continuous engine's prefix cache: block keys and LRU bounds (pure), then greedy outputs on
the tiny model with the cache equal to those without it, LoRA adapters mixed in one batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from protocol.schema import GenerationRequest
from tests.helpers import PROMPTS, Quiet, tiny_runner
from worker.engine.prefix_cache import BLOCK_TOKENS, PrefixCache, block_keys, prefix_cache_off_reason
from worker.engine.prefix_cache import reusable_blocks


def _block(nbytes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(nbytes // 8), torch.zeros(nbytes // 8))]  # float32: nbytes in all


def test_block_keys_chain_the_whole_prefix_and_the_namespace() -> None:
    a = list(range(200))
    b = [*range(64), *range(1000, 1136)]
    keys_a, keys_b = block_keys(a, "base"), block_keys(b, "base")
    assert len(keys_a) == 200 // BLOCK_TOKENS == 3
    assert keys_a[0] == keys_b[0] and keys_a[1] != keys_b[1]
    assert block_keys([7, *a[1:]], "base")[2] != keys_a[2]  # a later block names what came before
    assert block_keys(a, "second")[0] != keys_a[0]  # an adapter computes other keys and values
    assert block_keys(a[:63], "base") == []


def test_the_last_prompt_token_is_always_prefilled() -> None:
    assert [reusable_blocks(n) for n in (0, 1, 64, 65, 128, 129)] == [0, 0, 0, 1, 1, 2]


def test_match_takes_the_leading_run_and_eviction_is_least_recently_used() -> None:
    cache = PrefixCache(budget_bytes=3000)
    for key in (b"a", b"b", b"c"):
        cache.store(key, _block(1000))
    assert len(cache) == 3 and cache.used_bytes == 3000
    assert len(cache.match([b"a", b"x", b"c"], limit=3)) == 1  # stops at the first miss
    cache.store(b"d", _block(1000))  # evicts b, the least recently used (a was just matched)
    assert b"b" not in cache and b"a" in cache and b"d" in cache
    assert cache.used_bytes == 3000 and cache.stats.evicted_blocks == 1
    assert len(cache.match([b"a", b"c", b"d"], limit=2)) == 2
    cache.store(b"huge", _block(4000))  # over the whole budget: not kept, nothing evicted
    assert b"huge" not in cache and len(cache) == 3


def test_quantized_models_and_a_zero_budget_run_without_it() -> None:
    assert prefix_cache_off_reason("none", 256) is None
    assert "int8" in (prefix_cache_off_reason("int8", 256) or "")
    assert "nf4" in (prefix_cache_off_reason("nf4", 256) or "")
    assert prefix_cache_off_reason("none", 0) is not None


# --------------------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def runner(tiny_model: Path) -> Iterator[Any]:
    yield from tiny_runner(tiny_model)


def _shared_prompts(runner: Any) -> list[str]:
    """Prompts that start with the same ~200 tokens (three blocks), then differ."""
    prefix = " ".join(PROMPTS * 6)
    prompts = [f"{prefix} {p}" for p in PROMPTS]
    assert len(runner.encode(prompts[0])) > 3 * BLOCK_TOKENS
    return prompts


def _rows(runner: Any, prompts: list[str], adapters: list[str]) -> list[Any]:
    return [runner.new_row(f"r{i}", runner.encode(p), GenerationRequest(prompt=p, max_new_tokens=10, adapter=a,
                                                                        ignore_eos=True))
            for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))]


def _generate(runner: Any, prompts: list[str], adapters: list[str], prefix: PrefixCache | None,
              waves: int, chunk_tokens: int = 0) -> list[list[int]]:
    """Rows join in ``waves`` (later waves find what earlier ones cached), then run to the end."""
    from worker.engine.kv_slab import ContinuousBatch

    rows = _rows(runner, prompts, adapters)
    batch = ContinuousBatch(runner, prefix, chunk_tokens)
    size = -(-len(rows) // waves)
    for start in range(0, len(rows), size):
        while batch.joining:  # a chunked prefill of the wave before
            batch.step(Quiet())
            batch.evict()
        batch.join(rows[start:start + size], Quiet())
        batch.step(Quiet())
        batch.evict()
    while batch.rows:
        batch.step(Quiet())
        batch.evict()
    return [row.state.tokens for row in rows]


@pytest.mark.parametrize(("waves", "chunk"), [(1, 0), (3, 0), (3, 100)])
def test_greedy_outputs_with_the_cache_equal_those_without(runner: Any, waves: int, chunk: int) -> None:
    prompts = _shared_prompts(runner)
    adapters = ["default", "second", "base", "second", "default", "base", "second", "default"]
    without = _generate(runner, prompts, adapters, None, waves)
    cache = PrefixCache(64 * 2**20)
    assert _generate(runner, prompts, adapters, cache, waves, chunk) == without
    assert cache.stats.hit_tokens > 0  # some rows did take their prefix from the cache
    # A second pass finds every shared block cached: still the same tokens.
    hits = cache.stats.hit_tokens
    assert _generate(runner, prompts, adapters, cache, waves, chunk) == without
    if chunk:  # and chunked without the cache too
        assert _generate(runner, prompts, adapters, None, waves, chunk) == without
    assert cache.stats.hit_tokens - hits >= len(prompts) * 3 * BLOCK_TOKENS


def test_a_prompt_of_whole_blocks_and_a_tight_budget(runner: Any) -> None:
    ids = runner.encode(" ".join(PROMPTS * 8))[:2 * BLOCK_TOKENS]
    prompt = runner.loaded.tokenizer.decode(ids, skip_special_tokens=True)
    prompts = [prompt, prompt, _shared_prompts(runner)[0]]
    adapters = ["base"] * 3
    without = _generate(runner, prompts, adapters, None, 1)
    one_block = PrefixCache(1)  # too small for any block: runs as without
    assert _generate(runner, prompts, adapters, one_block, 1) == without and len(one_block) == 0
    cache = PrefixCache(64 * 2**20)
    assert _generate(runner, prompts, adapters, cache, 1) == without
    assert _generate(runner, prompts, adapters, cache, 1) == without


@pytest.mark.parametrize(("budget", "prefills"), [(64 * 2**20, [1, 3]), (1, [1, 3])])
def test_joiners_sharing_uncached_blocks_prefill_one_of_them_first(runner: Any, budget: int,
                                                                   prefills: list[int]) -> None:
    from worker.engine.kv_slab import ContinuousBatch

    prompts = _shared_prompts(runner)[:4]
    batch = ContinuousBatch(runner, PrefixCache(budget))
    sizes: list[int] = []
    prefill = batch._join
    batch._join = lambda rows, *args: (sizes.append(len(rows)), prefill(rows, *args))[1]  # type: ignore
    batch.join(_rows(runner, prompts, ["base"] * 4), Quiet())
    assert sizes == prefills  # the lead alone, then the others together (found cached, or not keepable)
    assert len(batch.rows) == 4
