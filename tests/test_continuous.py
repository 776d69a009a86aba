"""Continuous batching and mixed-adapter batches: in-process against the tiny model, then through a
real worker (``FARM_STRATEGY=continuous``) on its own Redis database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from producer import FarmClient
from protocol.names import stream_key
from protocol.schema import GenerationRequest
from protocol.settings import FarmSettings
from tests.conftest import RedisServer, WorkerProcess, start_worker, wait_until
from tests.helpers import PROMPTS, Quiet, reference_text, submit_all, tiny_runner

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def runner(tiny_model: Path) -> Iterator[Any]:
    yield from tiny_runner(tiny_model)


def _rows(runner: Any, prompts: list[str], new_tokens: list[int], adapters: list[str]) -> list[Any]:
    return [runner.new_row(f"r{i}", runner.encode(p), GenerationRequest(prompt=p, max_new_tokens=n, adapter=a,
                                                                        ignore_eos=True))
            for i, (p, n, a) in enumerate(zip(prompts, new_tokens, adapters, strict=True))]


def _plain_generate(runner: Any, prompt: str, new_tokens: int, adapter: str) -> list[int]:
    """The prompt alone through peft/transformers ``generate`` (greedy, EOS not stopping it)."""
    model = runner.loaded.model
    ids = torch.tensor([runner.encode(prompt)])
    with torch.inference_mode():
        if adapter == "base":
            with model.disable_adapter():
                out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        else:
            model.set_adapter(adapter)
            out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    return list(out[0, ids.shape[1]:].tolist())


def test_rows_joining_and_leaving_match_plain_generate(runner: Any) -> None:
    from worker.engine.kv_slab import ContinuousBatch

    lengths = [30, 5, 40, 12, 25, 8, 33, 3]
    rows = _rows(runner, PROMPTS, lengths, ["base"] * len(PROMPTS))
    batch = ContinuousBatch(runner)
    batch.join(rows[:2], Quiet())
    left: list[Any] = []
    for step in range(100):
        if step == 3:
            batch.join(rows[2:5], Quiet())  # joiners longer than the running rows
        if step == 9:
            batch.join(rows[5:], Quiet())  # after the short row left
        left += batch.evict()
        if step > 9 and not batch.rows:
            break
        batch.step(Quiet())
    assert {r.request_id for r in left} == {r.request_id for r in rows}
    assert left.index(rows[1]) < left.index(rows[0])  # the short row left first
    for row, prompt, n in zip(rows, PROMPTS, lengths, strict=True):
        assert row.state.tokens == _plain_generate(runner, prompt, n, "base"), prompt


@pytest.mark.parametrize("adapter", ["base", "default"])
def test_chunked_prefill_of_joiners_keeps_the_running_rows_going_and_matches_plain_generate(
        runner: Any, adapter: str) -> None:
    from worker.engine.kv_slab import ContinuousBatch

    lengths = [20, 12, 14, 9]
    rows = _rows(runner, PROMPTS[:4], lengths, [adapter] * 4)
    batch = ContinuousBatch(runner, chunk_tokens=6)  # 3 columns per step for two joiners
    batch.join(rows[:2], Quiet())  # nothing runs yet: prefilled at once
    assert not batch.joining and [len(r.state.tokens) for r in rows[:2]] == [1, 1]
    batch.step(Quiet())
    batch.join(rows[2:], Quiet())
    chunks = 1
    while batch.joining:
        assert rows[2].state.tokens == [] and rows[3].state.tokens == []
        batch.step(Quiet())
        chunks += 1
    widest = max(len(runner.encode(p)) for p in PROMPTS[2:4])
    assert chunks == -(-widest // 3)
    assert len(rows[0].state.tokens) == 2 + chunks - 1  # a token at every step while they filled
    while batch.rows:
        batch.evict()
        batch.step(Quiet())
    for row, prompt, n in zip(rows, PROMPTS, lengths, strict=False):
        assert row.state.tokens == _plain_generate(runner, prompt, n, adapter), prompt


@pytest.mark.parametrize("strategy", ["dynamic", "continuous"])
def test_one_batch_of_two_adapters_equals_each_adapter_alone(runner: Any, strategy: str) -> None:
    from worker.engine.kv_slab import ContinuousBatch

    adapters = ["default", "second", "base", "second", "default", "base", "second", "default"]
    mixed = _rows(runner, PROMPTS, [12] * len(PROMPTS), adapters)
    if strategy == "dynamic":
        runner.run(mixed, Quiet())
    else:
        batch = ContinuousBatch(runner)
        batch.join(mixed, Quiet())
        while batch.rows:
            batch.step(Quiet())
            batch.evict()
    for row, prompt, adapter in zip(mixed, PROMPTS, adapters, strict=True):
        assert row.state.tokens == _plain_generate(runner, prompt, 12, adapter), (prompt, adapter)
    assert mixed[0].state.tokens != _plain_generate(runner, PROMPTS[0], 12, "second")


@pytest.mark.parametrize("strategy", ["dynamic", "continuous"])
def test_a_warm_up_burst_changes_no_output(runner: Any, strategy: str) -> None:
    """The worker's warm-up runs the engine's code on throwaway rows (of the default adapter):
    afterwards every adapter's output is still plain ``generate``'s."""
    from worker.engine.warmup import warm_up

    assert warm_up(runner, FarmSettings(strategy=strategy, max_batch_size=8)) == 8
    adapters = ["second", "base", "default"]
    rows = _rows(runner, PROMPTS[:3], [10] * 3, adapters)
    runner.run(rows, Quiet())
    for row, prompt, adapter in zip(rows, PROMPTS, adapters, strict=False):
        assert row.state.tokens == _plain_generate(runner, prompt, 10, adapter), (prompt, adapter)


# --------------------------------------------------------------------------- through a worker


@pytest.fixture(scope="module")
def continuous_worker(redis_server: RedisServer, tiny_model: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A continuous-batching worker on Redis db 3 (its own queues), adapter ``default`` only."""
    redis_server.client("continuous").flushdb()
    worker = start_worker(redis_server.url("continuous"), tiny_model, tmp_path_factory.mktemp("continuous"),
                          name="cont@test", strategy="continuous", adapter=tiny_model / "adapter",
                          inject_faults=1, max_batch_size=16, max_wait_ms=20)
    yield worker
    worker.stop()


@pytest.fixture()
def cclient(continuous_worker: WorkerProcess) -> FarmClient:
    return FarmClient(continuous_worker.redis_url)


def test_continuous_outputs_equal_plain_generate(cclient: FarmClient, tiny_model: Path) -> None:
    results = submit_all(cclient, PROMPTS * 2, max_new_tokens=20, adapter="base")
    assert max(r.batch_size for r in results) > 1
    for prompt, result in zip(PROMPTS * 2, results, strict=True):
        assert result.ok and result.text == reference_text(tiny_model, prompt, 20), prompt


def test_short_request_finishes_before_earlier_long_one(cclient: FarmClient) -> None:
    long = cclient.submit("A long story", max_new_tokens=1024, ignore_eos=True)
    assert next(e for e in long.events(timeout=60) if e["type"] == "delta")
    short = cclient.generate("Quick", max_new_tokens=8, ignore_eos=True, timeout=60)
    assert short.ok and short.completion_tokens == 8
    assert long.status().state == "running"  # the short one joined, finished and left
    assert short.batch_size >= 2
    assert long.result(timeout=120).completion_tokens == 1024


def test_continuous_stream_equals_final_text(cclient: FarmClient, continuous_worker: WorkerProcess) -> None:
    handles = [cclient.submit(p, max_new_tokens=30 + 5 * i) for i, p in enumerate(PROMPTS[:4])]
    db = redis.Redis.from_url(continuous_worker.redis_url)
    for handle in handles:
        deltas = list(handle.stream(timeout=60))
        result = handle.result(timeout=30)
        assert len(deltas) > 1 and "".join(deltas) == result.text
        ttl = db.ttl(stream_key(handle.id))  # set with the first event, kept by the deltas
        assert 0 < ttl <= FarmSettings().result_expires


def test_cancel_one_row_of_a_continuous_batch(cclient: FarmClient) -> None:
    victim = cclient.submit("Cancel me", max_new_tokens=1024, ignore_eos=True)
    neighbour = cclient.submit("Keep me", max_new_tokens=1024, ignore_eos=True)
    assert next(e for e in victim.events(timeout=60) if e["type"] == "delta")
    victim.cancel()
    result = victim.result(timeout=30)
    assert result.finish_reason == "cancelled" and 0 < result.completion_tokens < 1024
    kept = neighbour.result(timeout=120)
    assert kept.ok and kept.completion_tokens == 1024


def test_poisoned_request_fails_alone_in_continuous_batch(cclient: FarmClient) -> None:
    prompts = [f"{p} <<poison>>" if i == 2 else p for i, p in enumerate(PROMPTS)]
    results = submit_all(cclient, prompts, max_new_tokens=8)
    assert results[2].finish_reason == "error" and results[2].error
    assert all(r.ok for i, r in enumerate(results) if i != 2)


def test_adapter_loaded_without_restart_serves_mixed_batch(cclient: FarmClient, tiny_model: Path,
                                                           continuous_worker: WorkerProcess) -> None:
    from worker.adapters import broadcast_load_adapter

    replies = broadcast_load_adapter(cclient.app, "late", str(tiny_model / "adapter2"), timeout=60,
                                     destination=["cont@test"])
    assert replies and replies[0]["cont@test"]["ok"], replies
    wait_until(lambda: "late" in cclient.workers()[0]["adapters"], 10, "heartbeat did not list the adapter")
    params = [{"adapter": "late"}, {"adapter": "default"}, {"adapter": "base"}, {"adapter": "late"}]
    handles = [cclient.submit(PROMPTS[i], max_new_tokens=12, **p) for i, p in enumerate(params)]
    results = [h.result(timeout=60) for h in handles]
    assert all(r.ok for r in results) and max(r.batch_size for r in results) > 1
    assert results[0].adapter == "late"
    assert results[0].text == reference_text(tiny_model, PROMPTS[0], 12, tiny_model / "adapter2")
    assert results[1].text == reference_text(tiny_model, PROMPTS[1], 12, tiny_model / "adapter")
    assert results[2].text == reference_text(tiny_model, PROMPTS[2], 12)
    bad = broadcast_load_adapter(cclient.app, "broken", str(tiny_model / "missing"), timeout=60,
                                 destination=["cont@test"])
    assert not bad[0]["cont@test"]["ok"]
    assert cclient.generate("still serving", max_new_tokens=4, adapter="late", timeout=60).ok


def test_dynamic_worker_batches_mixed_adapters(client: FarmClient, tiny_model: Path) -> None:
    adapters = ["second", "default", "base", "second", "default", "base", "second", "default"]
    handles = [client.submit(p, max_new_tokens=10, adapter=a) for p, a in zip(PROMPTS, adapters, strict=True)]
    results = [h.result(timeout=60) for h in handles]
    assert max(r.batch_size for r in results) > 1
    paths = {"second": tiny_model / "adapter2", "default": tiny_model / "adapter", "base": None}
    for prompt, adapter, result in zip(PROMPTS, adapters, results, strict=True):
        assert result.adapter == adapter
        assert result.text == reference_text(tiny_model, prompt, 10, paths[adapter]), (prompt, adapter)
