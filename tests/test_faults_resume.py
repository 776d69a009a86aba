"""Resume after a fault that lost writes (issue 12): a Redis restarted from its append-only file
may come back without its last second, or a worker's reserved messages may be gone with a restore
that failed. A resubmitted job then sends every row sent that has no stored result, is in no queue
and is reserved by no worker: such rows run again, never go missing, and each ends once.

The losses are made by hand here, exactly as Redis would have them after such a restart (a
prefix of its writes: the later ones gone), on a real Redis, with a real worker for the job."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest

from producer import FarmClient
from protocol.names import BULK_QUEUE, KOMBU_UNACKED, JobKeys, alive_key, executions_key, owners_key
from tests.conftest import RedisServer, wait_until
from tests.reliability_report import figures_from, record

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def prompts(tag: str, count: int) -> list[str]:
    return [f"{tag} row {i}" for i in range(count)]


@pytest.fixture()
def idle_client(redis_server: RedisServer) -> Iterator[FarmClient]:
    """A farm without workers (its own db): messages stay where a test can count them."""
    redis_server.client("faults-resume").flushdb()
    yield FarmClient(redis_server.url("faults-resume"))
    redis_server.client("faults-resume").flushdb()


def queued_ids(client: FarmClient) -> list[str]:
    return sorted(json.loads(raw)["headers"]["id"] for raw in client.redis.lrange(BULK_QUEUE, 0, -1))


def take(client: FarmClient, task_id: str, tag: str, owner: str) -> None:
    """Move a row's message from the queue into kombu's unacked index, held by ``owner`` (what
    the worker's atomic pop does)."""
    (raw,) = [r for r in client.redis.lrange(BULK_QUEUE, 0, -1) if json.loads(r)["headers"]["id"] == task_id]
    client.redis.lrem(BULK_QUEUE, 1, raw)
    client.redis.hset(KOMBU_UNACKED, tag, json.dumps([json.loads(raw), "", BULK_QUEUE]))
    client.redis.hset(owners_key(), tag, f"{owner}\n{BULK_QUEUE}")


def test_resume_resends_rows_whose_message_is_nowhere_and_only_them(idle_client: FarmClient) -> None:
    rows, keys = prompts("lost", 10), JobKeys("lost")
    first = idle_client.submit_job(rows, "lost", max_new_tokens=2)
    wait_until(lambda: first.progress().sent == 10, 10, "the rows were not sent")
    first.close()
    take(idle_client, "lost:4", "tag-live", "w@a/1/live")  # held by a live worker
    idle_client.redis.set(alive_key("w@a/1/live"), "1", ex=60)
    take(idle_client, "lost:5", "tag-dead", "w@b/2/dead")  # a dead one's: a sweeper returns it
    for index in (2, 7):  # gone: sent, with no result, in no queue, held by nobody
        (raw,) = [r for r in idle_client.redis.lrange(BULK_QUEUE, 0, -1) if f'"lost:{index}"'.encode() in r]
        idle_client.redis.lrem(BULK_QUEUE, 1, raw)
    idle_client.redis.hdel(keys.rows, "7")  # and without its stored request: the prompts given send it
    again = idle_client.submit_job(rows, "lost", max_new_tokens=2)
    wait_until(lambda: len(queued_ids(idle_client)) == 8, 10, "the lost rows were not sent again")
    time.sleep(0.3)  # nothing more comes
    again.close()
    assert queued_ids(idle_client) == [f"lost:{i}" for i in (0, 1, 2, 3, 6, 7, 8, 9)]
    assert again.progress().sent == 10


def test_resume_after_lost_results_ends_every_row_exactly_once(client: FarmClient) -> None:
    rows, job_id = prompts("aof", 40), f"aof-{uuid.uuid4().hex[:8]}"
    keys, params = JobKeys(job_id), {"max_new_tokens": 4}
    first = client.submit_job(rows, job_id, **params)
    assert len(list(first.results(timeout=120))) == 40
    first.close()
    # Redis restarted without its last second: those rows' results, their outcome bits, the
    # deletion of their stored requests and the job's "finished" are gone.
    lost = [5, 20, 39]
    for index in lost:
        client.redis.delete(client.connection.result_key(f"{job_id}:{index}"))
        client.redis.setbit(keys.ok, index, 0)
        if index != 39:  # row 39's stored request is gone too
            request = client.validate(rows[index], **params).to_dict()
            client.redis.hset(keys.rows, str(index), json.dumps(request))
    client.redis.hset(keys.info, "state", "running")
    started = time.monotonic()
    again = client.submit_job(rows, job_id, **params)
    results = list(again.results(timeout=120))
    seconds = time.monotonic() - started
    again.close()
    ids = [f"{job_id}:{i}" for i in range(40)]
    runs = {k.decode(): int(v) for k, v in client.redis.hgetall(executions_key()).items()
            if k.decode().startswith(f"{job_id}:")}
    record(figures_from("resume after lost writes", ids, [r.id for r in results], runs, {},
                        rows_lost=len(lost), resumed_in_s=round(seconds, 1)))
    assert [r.id for r in results] == ids and all(r.ok for r in results)
    assert runs == {task_id: 2 if int(task_id.rsplit(":", 1)[1]) in lost else 1 for task_id in ids}
    assert again.progress().state == "finished"
