"""Bulk jobs through the Python API against a real Redis and the shared tiny-model worker."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from producer import FarmClient, Job
from protocol.errors import RequestError
from protocol.names import BULK_QUEUE, JobKeys, executions_key, job_key
from tests.conftest import RedisServer, wait_until

pytestmark = pytest.mark.integration


def executions(client: FarmClient, job: Job) -> dict[int, int]:
    """Times the worker ran each row of ``job`` (the worker counts executions per request id)."""
    prefix = f"{job.id}:"
    counts = client.redis.hgetall(executions_key())
    return {int(k.decode()[len(prefix):]): int(v) for k, v in counts.items() if k.decode().startswith(prefix)}


def prompts(tag: str, count: int) -> list[str]:
    return [f"{tag} row {i}" for i in range(count)]


def test_job_of_2000_prompts_completes_in_input_order_each_row_once(client: FarmClient) -> None:
    deepest = 0
    done = threading.Event()

    def sample_queue() -> None:  # the window bounds what the job puts in Redis at once
        nonlocal deepest
        while not done.wait(0.02):
            deepest = max(deepest, int(client.redis.llen(BULK_QUEUE)))

    sampler = threading.Thread(target=sample_queue, daemon=True)
    sampler.start()
    job = client.submit_job(prompts("order", 2000), window=128, max_new_tokens=2)
    results = list(job.results(timeout=180))
    done.set()
    sampler.join()
    assert [r.id for r in results] == [f"{job.id}:{i}" for i in range(2000)]
    assert all(r.ok and r.finish_reason == "length" and r.completion_tokens == 2 for r in results)
    assert executions(client, job) == dict.fromkeys(range(2000), 1)
    assert 0 < deepest <= 128
    progress = job.progress()
    assert (progress.state, progress.done, progress.pending, progress.sent) == ("finished", 2000, 0, 2000)


def test_as_completed_reattach_and_async_agree(client: FarmClient) -> None:
    job = client.submit_job(prompts("views", 40), max_new_tokens=3)
    seen = dict(job.as_completed(timeout=60))
    assert sorted(seen) == list(range(40))
    in_order = [r.text for r in job.results(timeout=60)]
    assert in_order == [seen[i].text for i in range(40)]

    other = FarmClient(client.settings.redis_url).job(job.id)  # another client, as another process would
    assert other.total == 40 and other.progress().state == "finished"
    assert [r.text for r in other.results(timeout=60)] == in_order

    async def collect() -> list[str]:
        await other.wait_async(timeout=60)
        return [r.text async for r in other.aresults()]

    assert asyncio.run(collect()) == in_order


def test_resubmitting_a_finished_job_runs_nothing_again(client: FarmClient) -> None:
    rows = prompts("again", 30)
    job_id = f"again-{uuid.uuid4().hex[:8]}"
    first = [r.text for r in client.submit_job(rows, job_id, max_new_tokens=3).results(timeout=60)]
    second = client.submit_job(rows, job_id, max_new_tokens=3)
    assert [r.text for r in second.results(timeout=60)] == first
    assert executions(client, second) == dict.fromkeys(range(30), 1)
    with pytest.raises(RequestError, match="exists with other parameters"):
        client.submit_job(rows, job_id, max_new_tokens=4)
    with pytest.raises(RequestError, match="has 30 rows, not 29"):
        client.submit_job(rows[:29], job_id, max_new_tokens=3)
    with pytest.raises(RequestError, match="window: must be at least 1, got 0"):
        client.submit_job(rows, window=0)
    with pytest.raises(RequestError, match="prompt: give prompts as the rows of the job"):
        client.submit_job(rows, prompt="x")


def test_failed_rows_are_recorded_and_retry_failed_reruns_only_them(client: FarmClient) -> None:
    rows: list[object] = prompts("retry", 20)
    rows[4] = "retry row 4 <<poison>>"  # the worker's fault injection fails this one
    rows[7] = {"prompt": "retry row 7", "max_new_tokens": 0}  # invalid: recorded, never sent
    rows[9] = {"prompt": "retry row 9", "max_new_tokens": 5}  # its own parameter wins
    job = client.submit_job(rows, max_new_tokens=3)
    results = list(job.results(timeout=60))
    assert [i for i, r in enumerate(results) if not r.ok] == [4, 7]
    assert results[4].finish_reason == "error" and "poisoned" in results[4].error["message"]  # type: ignore[index]
    assert results[7].error == {"code": "invalid_request",
                                "message": "row 7: max_new_tokens: must be between 1 and 1024, got 0"}
    assert results[9].completion_tokens == 5
    progress = job.progress()
    assert (progress.done, progress.failed, progress.state) == (18, 2, "finished")

    before = executions(client, job)
    assert 7 not in before
    for _ in range(3):  # at once after the last result, again and again: the pump may be on its way out
        runs = executions(client, job)
        assert job.retry_failed() == 1  # row 7 has no valid request to send again
        again = list(job.results(timeout=60))
        assert again[4].finish_reason == "error"
        after = executions(client, job)
        assert after[4] > runs[4]
    assert {i: n for i, n in after.items() if i != 4} == {i: n for i, n in before.items() if i != 4}


def test_cancel_running_1000_row_job(client: FarmClient) -> None:
    job = client.submit_job(prompts("cancel", 1000), max_new_tokens=16)
    wait_until(lambda: job.progress().done >= 50, 60, "the job did not start")
    job.cancel()
    job.wait(timeout=30)  # queued rows revoked, running rows stopped, unsent rows never sent
    ran = len(executions(client, job))
    time.sleep(2)
    assert len(executions(client, job)) == ran < 1000
    results = list(job.results(timeout=30))
    reasons = [r.finish_reason for r in results]
    assert len(results) == 1000 and set(reasons) <= {"length", "cancelled"}
    assert reasons.count("cancelled") >= 1000 - ran
    progress = job.progress()
    assert (progress.state, progress.cancelled, progress.pending) == ("cancelled", reasons.count("cancelled"), 0)
    assert client.redis.llen(BULK_QUEUE) == 0


def test_interactive_request_is_served_before_the_remaining_bulk_rows(client: FarmClient) -> None:
    job = client.submit_job(prompts("busy", 800), max_new_tokens=16)
    wait_until(lambda: job.progress().done >= 64, 60, "the job did not start")
    submitted, pending_then = time.monotonic(), job.progress().pending
    result = client.generate("an interactive question", max_new_tokens=16, timeout=60)
    pending_when_served = job.progress().pending
    job.wait(timeout=120)
    remaining = time.monotonic() - submitted
    assert result.ok
    # It overtook the bulk rows queued before it: most of them finished after it did.
    assert pending_when_served > pending_then * 0.6, (pending_then, pending_when_served)
    assert result.queue_seconds < remaining / 4, (result.queue_seconds, remaining)


@pytest.fixture()
def idle_client(redis_server: RedisServer) -> Iterator[FarmClient]:
    """A farm without workers (its own Redis db): messages stay in the queue, where a test can
    count them."""
    redis_server.client("producer-jobs").flushdb()
    yield FarmClient(redis_server.url("producer-jobs"))
    redis_server.client("producer-jobs").flushdb()


def queued_ids(client: FarmClient) -> list[str]:
    return sorted(json.loads(raw)["headers"]["id"] for raw in client.redis.lrange(BULK_QUEUE, 0, -1))


def test_a_producer_killed_in_the_middle_of_a_chunk_sends_no_row_twice(idle_client: FarmClient) -> None:
    rows = prompts("settle", 10)
    first = idle_client.submit_job(rows, "settle", window=4, max_new_tokens=2)
    wait_until(lambda: first.progress().sent == 4, 10, "the window was not filled")
    first.close()
    assert queued_ids(idle_client) == [f"settle:{i}" for i in range(4)]
    # What a producer killed between enqueueing a chunk and recording it leaves behind: rows 4
    # and 5 marked as being sent, and only row 4's message in the queue.
    idle_client.redis.sadd("farm:job:settle:sending", 4, 5)
    idle_client.send(idle_client.validate("settle row 4", max_new_tokens=2), queue=BULK_QUEUE,
                     request_id="settle:4")
    again = idle_client.submit_job(rows, "settle", window=7, max_new_tokens=2)
    wait_until(lambda: again.progress().sent == 7, 10, "the window was not filled")
    again.close()
    assert queued_ids(idle_client) == [f"settle:{i}" for i in range(7)]


def test_a_generator_of_prompts_sets_the_total_when_it_runs_out(client: FarmClient) -> None:
    job = client.submit_job((f"lazy row {i}" for i in range(25)), window=8, max_new_tokens=2)
    results = list(job.results(timeout=60))
    assert [r.id for r in results] == [f"{job.id}:{i}" for i in range(25)]
    assert job.total == 25 and client.job(job.id).total == 25


def job_keys(client: FarmClient) -> list[bytes]:
    return sorted(client.redis.scan_iter(match=job_key("*")))


def test_a_reused_job_id_with_other_prompts_is_refused_and_the_same_prompts_resume(idle_client: FarmClient) -> None:
    rows = prompts("reuse", 10)
    first = idle_client.submit_job(rows, "reuse", window=4, max_new_tokens=2)
    wait_until(lambda: first.progress().sent == 4, 10, "the window was not filled")
    first.close()
    keys, info = job_keys(idle_client), idle_client.redis.hgetall(job_key("reuse"))
    other = [*rows[:9], "reuse row 9, edited"]  # as many rows, one of them changed
    for refused in (other, other[::-1]):
        with pytest.raises(RequestError, match="^job_id: job reuse was submitted with other prompts"):
            idle_client.submit_job(refused, "reuse", window=8, max_new_tokens=2)
    with pytest.raises(RequestError, match="^job_id: job reuse exists; prompts given lazily"):
        idle_client.submit_job(iter(other), "reuse", window=8, max_new_tokens=2)
    # Refused before anything was sent or written: the queue, the job's keys and record, the lease.
    assert queued_ids(idle_client) == [f"reuse:{i}" for i in range(4)]
    assert job_keys(idle_client) == keys and idle_client.redis.hgetall(job_key("reuse")) == info
    assert not idle_client.redis.exists(JobKeys("reuse").producer)

    again = idle_client.submit_job(list(rows), "reuse", window=7, max_new_tokens=2)  # the same prompts
    wait_until(lambda: again.progress().sent == 7, 10, "the resumed job sent nothing")
    again.close()
    assert queued_ids(idle_client) == [f"reuse:{i}" for i in range(7)]  # rows 0-3 not sent twice


def test_an_unknown_adapter_as_a_job_parameter_is_refused_before_anything_is_created(client: FarmClient) -> None:
    offered = client.limits().adapters
    assert offered and "nosuch" not in offered  # the workers' heartbeat names their adapters
    keys, queued = job_keys(client), client.queue_depths()
    with pytest.raises(RequestError, match="^adapter: unknown adapter 'nosuch' \\(offered: "):
        client.submit_job(prompts("adapter", 5), "adapter-job", adapter="nosuch")
    assert job_keys(client) == keys and client.queue_depths() == queued
