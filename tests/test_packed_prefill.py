"""Packed prefill (``worker/engine/packed_prefill.py``): the layout in pure tests, then joiners
prefilled packed on the tiny model giving exactly plain ``generate``'s tokens, with and without
prefix-cached blocks; mixed adapters and single rows stay padded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from protocol.schema import GenerationRequest
from tests.helpers import PROMPTS, Quiet, tiny_runner
from worker.engine.packed_prefill import Costs, assign, pack, plan_bins, unpack
from worker.engine.prefix_cache import BLOCK_TOKENS, PrefixCache


def test_prompts_lie_end_to_end_and_each_token_sees_only_its_own_prompt() -> None:
    packed = pack([[5, 6, 7], [8, 9]], [[], []], "cpu")
    assert packed.ids.tolist() == [[5, 6, 7, 8, 9]] and packed.positions.tolist() == [[0, 1, 2, 0, 1]]
    assert packed.past is None and packed.last.tolist() == [2, 4]
    sees = packed.mask[0, 0].int().tolist()
    assert sees == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    # back to the batch's layout: rows right-aligned, the short one left-padded (masked)
    assert packed.row_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert packed.gather.tolist()[0] == [0, 1, 2] and packed.gather.tolist()[1][1:] == [3, 4]


def test_a_cached_block_shared_by_two_rows_is_held_once() -> None:
    block = [(torch.full((2, BLOCK_TOKENS, 4), 1.0), torch.full((2, BLOCK_TOKENS, 4), 2.0))]  # one layer
    other = [(torch.zeros(2, BLOCK_TOKENS, 4), torch.zeros(2, BLOCK_TOKENS, 4))]
    prompts = [list(range(BLOCK_TOKENS + 2)), list(range(BLOCK_TOKENS + 1)), list(range(2 * BLOCK_TOKENS + 1))]
    cached = [[(b"a", block)], [(b"a", block)], [(b"a", block), (b"b", other)]]
    packed = pack(prompts, cached, "cpu")
    assert packed.past is not None and packed.past[0][0].shape == (1, 2, 2 * BLOCK_TOKENS, 4)  # a, b once each
    assert packed.positions.tolist() == [[BLOCK_TOKENS, BLOCK_TOKENS + 1, BLOCK_TOKENS, 2 * BLOCK_TOKENS]]
    sees = packed.mask[0, 0]
    past = 2 * BLOCK_TOKENS
    assert sees[:3, :BLOCK_TOKENS].all() and not sees[:3, BLOCK_TOKENS:past].any()  # rows 1, 2: block a only
    assert sees[3, :past].all()  # row 3: a and b
    assert sees[1, past:].tolist() == [True, True, False, False]
    assert sees[2, past:].tolist() == [False, False, True, False]
    assert packed.gather[0, -(BLOCK_TOKENS + 2):].tolist() == list(range(BLOCK_TOKENS)) + [past, past + 1]
    assert packed.row_mask.sum(-1).tolist() == [len(p) for p in prompts]


def test_bins_split_prompts_and_padding_sees_only_itself() -> None:
    assert assign([3, 2, 1], 2) == [0, 1, 1]  # longest first, each into the lightest bin
    packed = pack([[5, 6, 7], [8, 9], [4]], [[], [], []], "cpu", bins=2)
    assert packed.ids.tolist() == [[5, 6, 7], [8, 9, 4]] and packed.positions.tolist() == [[0, 1, 2], [0, 1, 0]]
    assert packed.bins.tolist() == [0, 1, 1] and packed.last.tolist() == [2, 4, 5]  # flattened [bin, column]
    assert packed.mask[1, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert packed.gather.tolist() == [[0, 1, 2], [0, 0, 1], [0, 0, 2]]
    padded = pack([[5, 6, 7], [8]], [[], []], "cpu", bins=2)
    assert padded.ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert padded.mask[1, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # padding sees itself, no NaN
    keys = torch.arange(2 * 3, dtype=torch.float32).view(2, 1, 3, 1)  # [G, H, T, D]: bin 1 holds 3, 4, 5
    rows, _ = unpack(packed, keys, keys)
    assert rows[:, 0, :, 0].tolist() == [[0, 1, 2], [3, 3, 4], [3, 3, 5]]  # right-aligned, padding masked


def test_the_layout_of_fewest_flops_is_chosen() -> None:
    costs = Costs(token=2e8, pair=4e4)
    assert plan_bins(costs, [12, 50, 18, 45, 11], [0] * 5, 0) >= 1  # short prompts of unequal lengths
    assert plan_bins(costs, [40, 40, 40], [0] * 3, 0) == 0  # equal lengths: nothing to save
    assert plan_bins(Costs(token=1.0, pair=1.0), [400, 300, 350], [0] * 3, 0) == 0  # attention-bound: padded
    # rows after a shared cached prefix: held once, so still cheaper packed
    assert plan_bins(costs, [5, 30, 12], [512] * 3, 512) >= 1
    # many prompts: one bin pays attention over every masked pair, a few bins do not (the bench's
    # 64 prompts: 3.3 s in one bin, 2.3 s in 8)
    many = [8, 20, 35, 72, 14, 50, 28, 44] * 8
    bins = plan_bins(Costs(token=2e8, pair=3.7e4), many, [0] * 64, 0)
    assert 2 <= bins < 64


@pytest.fixture(scope="module")
def runner(tiny_model: Path) -> Iterator[Any]:
    yield from tiny_runner(tiny_model)


def _plain_generate(runner: Any, ids: list[int], new_tokens: int, adapter: str) -> list[int]:
    model = runner.loaded.model
    with torch.inference_mode():
        if adapter == "base":
            with model.disable_adapter():
                out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                     eos_token_id=None)
        else:
            model.set_adapter(adapter)
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None)
    return list(out[0, len(ids):].tolist())


def _run(runner: Any, prompts: list[str], adapters: list[str], waves: list[int], prefix: PrefixCache | None = None,
         packed: bool = True) -> tuple[list[Any], Any]:
    """Rows join in groups of ``waves`` (the first when nothing runs, the others while rows run)."""
    from worker.engine.kv_slab import ContinuousBatch

    rows = [runner.new_row(f"r{i}", runner.encode(p), GenerationRequest(prompt=p, max_new_tokens=8 + i, adapter=a,
                                                                        ignore_eos=True))
            for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))]
    batch = ContinuousBatch(runner, prefix, chunk_tokens=2048, packed_prefill=packed)
    start = 0
    for size in waves:
        batch.join(rows[start:start + size], Quiet())
        start += size
        batch.step(Quiet())
        batch.evict()
    while batch.rows:
        batch.step(Quiet())
        batch.evict()
    return rows, batch


@pytest.mark.integration
def test_joiners_prefilled_packed_generate_what_plain_generate_does(runner: Any) -> None:
    prompts = PROMPTS
    rows, batch = _run(runner, prompts, ["default"] * 8, [6, 2])
    assert batch.packed_prefills == 2  # both waves, the second while the first ran
    assert batch.packed_bins > 1  # the tiny model's attention is dear: its prompts go in several bins
    for row in rows:
        assert row.state.tokens == _plain_generate(runner, row.input_ids, row.request.max_new_tokens, "default")
    padded, off = _run(runner, prompts, ["default"] * 8, [6, 2], packed=False)
    assert off.packed_prefills == 0 and [r.state.tokens for r in padded] == [r.state.tokens for r in rows]


@pytest.mark.integration
def test_packed_joiners_after_cached_prefix_blocks(runner: Any) -> None:
    shared = " ".join(PROMPTS * 6)
    prompts = [f"{shared} {p}" for p in PROMPTS[:6]]
    cache = PrefixCache(64 * 2**20)
    first, _ = _run(runner, prompts[:1], ["base"], [1], cache)  # caches the shared blocks
    rows, batch = _run(runner, prompts, ["base"] * 6, [6], cache)
    assert batch.packed_prefills == 1 and cache.stats.hit_tokens >= 6 * 3 * BLOCK_TOKENS
    assert rows[0].state.tokens[:len(first[0].state.tokens)] == first[0].state.tokens
    for row in rows:
        assert row.state.tokens == _plain_generate(runner, row.input_ids, row.request.max_new_tokens, "base")


@pytest.mark.integration
def test_mixed_adapters_and_a_lone_row_stay_padded(runner: Any) -> None:
    rows, batch = _run(runner, PROMPTS[:5], ["default", "second", "base", "default", "second"], [4, 1])
    assert batch.packed_prefills == 0
    for row in rows:
        assert row.state.tokens == _plain_generate(runner, row.input_ids, row.request.max_new_tokens, row.adapter)


def test_merged_rows_are_right_aligned_on_zeros_in_one_buffer() -> None:
    from worker.engine.slab_layer import stacked

    old, new = torch.ones(2, 3, 4, 5), torch.full((1, 3, 2, 5), 2.0)
    out = stacked([old, new], 6, 4)  # 4 columns in use, 2 spare
    assert out.shape == (3, 3, 6, 5)
    assert bool((out[:2, :, :4] == 1).all()) and bool((out[2, :, :2] == 0).all()) and bool((out[2, :, 2:4] == 2).all())
    exact = stacked([new, old], 6, 6)  # a layer without spare columns: padded to the batch's width
    assert bool((exact[0, :, :4] == 0).all()) and bool((exact[0, :, 4:] == 2).all())
    assert bool((exact[1:, :, :2] == 0).all()) and bool((exact[1:, :, 2:] == 1).all())
