"""A job's Redis store and its lease, on a real Redis (the session's redis-server, its own db)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from producer.connection import FarmConnection
from producer.jobs import CANCELLED, FAILED, OK, JobStore, Lease, book_from_bitmaps
from producer.jobs.store import new_info
from protocol.errors import ErrorCode, FarmError, RequestError
from protocol.names import BULK_QUEUE, KOMBU_UNACKED, stream_key, submitted_key
from protocol.settings import FarmSettings
from tests.conftest import RedisServer


@pytest.fixture()
def connection(redis_server: RedisServer) -> Iterator[FarmConnection]:
    redis_server.client("producer-store").flushdb()
    yield FarmConnection(dataclasses.replace(FarmSettings.from_env(), redis_url=redis_server.url("producer-store")))
    redis_server.client("producer-store").flushdb()


@pytest.fixture()
def store(connection: FarmConnection) -> JobStore:
    store = JobStore(connection, "j1")
    store.create(new_info({"max_new_tokens": 4}, 6, "f"))
    return store


def test_a_new_job_reads_back_and_an_unknown_one_reads_empty(connection: FarmConnection, store: JobStore) -> None:
    info, bitmaps = store.read()
    assert (info["total"], json.loads(info["params"]), info["state"], info["fingerprint"]) == (
        "6", {"max_new_tokens": 4}, "running", "f")
    assert bitmaps == [b"", b"", b"", b""]
    assert JobStore(connection, "other").read() == ({}, [b"", b"", b"", b""])
    assert JobStore(connection, "other").state() == ""


def test_writes_given_a_pipeline_wait_for_its_execute(store: JobStore) -> None:
    pipe = store.pipeline()
    store.set_state("finished", pipeline=pipe)
    store.set_total(7, pipeline=pipe)
    assert store.state(pipeline=pipe) is None
    assert store.state() == "running" and store.read()[0]["total"] == "6"
    assert pipe.execute()[-1] == b"finished"
    assert store.state() == "finished" and store.read()[0]["total"] == "7"


def test_a_sent_chunk_leaves_sending_for_sent_with_its_requests_kept(connection: FarmConnection,
                                                                   store: JobStore) -> None:
    chunk = [(0, {"prompt": "a"}), (1, {"prompt": "b"}), (2, FarmError(ErrorCode.INTERNAL, "bad row"))]
    store.before_send(chunk, now=1.0)
    redis = connection.redis
    assert redis.smembers(store.keys.sending) == {b"0", b"1", b"2"}
    assert json.loads(redis.get(submitted_key("j1:1")) or b"") == {"submitted_at": 1.0, "job": "j1", "index": 1}
    assert redis.exists(submitted_key("j1:2")) == 0
    store.mark_sent([0, 1, 2])
    assert redis.scard(store.keys.sending) == 0
    _, bitmaps = store.read()
    assert book_from_bitmaps(6, *bitmaps).outstanding == {0, 1, 2}
    assert store.requests([0, 1, 2]) == [(0, {"prompt": "a"}), (1, {"prompt": "b"})]


def test_outcomes_keep_only_failed_requests_and_a_reset_makes_rows_unsent(connection: FarmConnection,
                                                                       store: JobStore) -> None:
    store.before_send([(i, {"prompt": str(i)}) for i in range(3)], now=1.0)
    store.mark_sent([0, 1, 2])
    store.record([(0, OK), (1, FAILED), (2, CANCELLED)])
    book = book_from_bitmaps(6, *store.read()[1])
    assert [book.states[i] & 3 for i in range(3)] == [OK, FAILED, CANCELLED]
    assert store.requests([0, 1, 2]) == [(1, {"prompt": "1"})]
    connection.store_failure("j1:1", FarmError(ErrorCode.INTERNAL, "boom"))
    store.set_state("finished")
    store.reset([1])
    book = book_from_bitmaps(6, *store.read()[1])
    assert book.untouched(1) and store.state() == "running"
    assert store.results([1]) == [(1, None)]


def test_results_decode_what_celery_stored(connection: FarmConnection, store: JobStore) -> None:
    connection.store_failure("j1:3", FarmError(ErrorCode.INTERNAL, "row 3: bad"))
    [(missing, none), (index, failed)] = store.results([2, 3])
    assert (missing, none, index) == (2, None, 3)
    assert failed is not None and failed.error == {"code": "internal", "message": "row 3: bad"}


def test_settling_counts_rows_whose_message_left_a_trace(connection: FarmConnection, store: JobStore) -> None:
    redis = connection.redis
    redis.sadd(store.keys.sending, 0, 1, 2, 3)
    redis.xadd(stream_key("j1:0"), {"event": "{}"})  # a worker started it
    message = {"headers": {"id": "j1:1"}, "body": ""}
    redis.rpush(BULK_QUEUE, json.dumps(message))  # still queued
    redis.hset(KOMBU_UNACKED, "tag", json.dumps([{"headers": {"id": "j1:2"}}, "", BULK_QUEUE]))  # reserved
    assert store.settle_sending() == [0, 1, 2]
    assert redis.exists(store.keys.sending) == 0
    assert book_from_bitmaps(6, *store.read()[1]).outstanding == {0, 1, 2}
    assert store.settle_sending() == []


def test_cancel_marks_the_job_and_returns_the_bitmaps_before(store: JobStore) -> None:
    store.before_send([(0, {"prompt": "a"})], now=1.0)
    store.mark_sent([0])
    assert book_from_bitmaps(6, *store.cancel()).outstanding == {0}
    assert store.state() == "cancelled"


# --- the lease ----------------------------------------------------------------------------------
def lease(connection: FarmConnection) -> Lease:
    return Lease(connection, "farm:job:j1:producer", "j1", seconds=5)


def test_the_lease_is_held_refreshed_and_released(connection: FarmConnection) -> None:
    first = lease(connection)
    first.acquire()
    assert first.held and connection.redis.get(first.key) == (first.token or "").encode()
    pipe = connection.redis.pipeline(transaction=False)
    first.refresh(pipe)
    holder, _ = pipe.execute()
    first.keep(holder)
    assert first.held
    first.release()
    assert not first.held and connection.redis.exists(first.key) == 0


def test_a_live_holder_on_this_host_is_refused_at_once(connection: FarmConnection) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        connection.redis.set("farm:job:j1:producer", f"{socket.gethostname()}:{other.pid}:x")
        with pytest.raises(RequestError, match="job_id: job j1 is being submitted by another producer"):
            lease(connection).acquire()
    finally:
        other.kill()
        other.wait()


def test_a_dead_holder_on_this_host_is_replaced(connection: FarmConnection) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    connection.redis.set("farm:job:j1:producer", f"{socket.gethostname()}:{gone.pid}:x")
    taker = lease(connection)
    taker.acquire()
    assert taker.held and str(os.getpid()) in (taker.token or "")


def test_a_lease_taken_over_is_lost_and_an_expired_one_taken_back(connection: FarmConnection) -> None:
    mine = lease(connection)
    mine.acquire()
    connection.redis.delete(mine.key)  # expired while this process slept
    mine.keep(None)
    assert connection.redis.get(mine.key) == (mine.token or "").encode()
    connection.redis.set(mine.key, "elsewhere:1:y")
    with pytest.raises(RequestError, match="another producer took over this job"):
        mine.keep(b"elsewhere:1:y")
    assert not mine.held
    mine.release()
    assert connection.redis.get(mine.key) == b"elsewhere:1:y"  # not ours: left alone
