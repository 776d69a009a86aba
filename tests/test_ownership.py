"""Ownership of reserved messages (protocol/ownership.py with worker/transport.py) on a real Redis:
a pop records its owner; a sweep returns a dead owner's messages, marked redelivered, to the front
of their queue, once however many sweepers run; a live owner's messages stay however old; an ack
from a worker that was cut off never forgets the message another worker holds now."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from protocol import ownership
from protocol.names import alive_key, owners_key
from tests.conftest import RedisServer, wait_until
from worker import transport

pytestmark = pytest.mark.integration

QUEUE = Queue("owned-test", Exchange("owned-test"), routing_key="owned-test")
DB = "ownership"


@pytest.fixture
def db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client(DB)
    client.flushdb()
    yield client
    client.flushdb()


def worker_connection(redis_server: RedisServer, owner: str) -> Connection:
    return Connection(redis_server.url(DB), transport=transport.SafeTransport,
                      transport_options={"visibility_timeout": 3600, "farm_owner": owner})


def publish(conn: Connection, count: int) -> None:
    with conn.Producer(serializer="json") as producer:
        for n in range(count):
            producer.publish({"n": n}, exchange=QUEUE.exchange, routing_key=QUEUE.routing_key, declare=[QUEUE])


def reserve(conn: Connection, count: int) -> list[Any]:
    """Take ``count`` messages as a worker does and keep them unacknowledged."""
    got: list[Any] = []
    with conn.Consumer(QUEUE, callbacks=[lambda body, message: got.append(message)], accept=["json"]):
        deadline = time.monotonic() + 10
        while len(got) < count and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.5)
            except TimeoutError:
                pass
    assert len(got) == count
    return got


def alive(db: redis.Redis, owner: str) -> None:
    db.set(alive_key(owner), "1", ex=60)


def test_pop_records_owner_and_queue(redis_server: RedisServer, db: redis.Redis) -> None:
    conn = worker_connection(redis_server, "w1/1/a")
    try:
        publish(conn, 1)
        (message,) = reserve(conn, 1)
        record = db.hget(owners_key(), message.delivery_tag)
        assert record is not None and ownership.parse_record(record) == ("w1/1/a", QUEUE.name)
        message.ack()
        assert db.hlen(owners_key()) == 0 and db.hlen("unacked") == 0 and db.zcard("unacked_index") == 0
    finally:
        conn.release()


def test_dead_owner_messages_restored_to_front_once(redis_server: RedisServer, db: redis.Redis) -> None:
    dead, live = worker_connection(redis_server, "dead/1/a"), worker_connection(redis_server, "live/2/b")
    try:
        publish(dead, 6)
        held = reserve(dead, 2)  # dead takes n=0,1 (its liveness never set: it died)
        alive(db, "live/2/b")
        kept = reserve(live, 1)  # live takes n=2
        db.lpush(QUEUE.name, b"later")  # what the producer sends next goes to the back
        with ThreadPoolExecutor(4) as pool:  # four sweepers at once
            counts = list(pool.map(lambda _: ownership.sweep(db, ttl=0), range(4)))
        assert sum(counts) == 2
        queued = [json.loads(item) if item != b"later" else item for item in db.lrange(QUEUE.name, 0, -1)]
        assert queued[0] == b"later" and len(queued) == 6  # the 3 never taken, 2 restored, later
        restored = queued[-2:]  # the end workers pop next
        assert {json.loads(base64.b64decode(m["body"]))["n"] for m in restored} == {0, 1}
        assert all(m["properties"]["delivery_info"]["redelivered"] for m in restored)
        assert all(m["headers"]["redelivered"] for m in restored)
        assert db.hkeys(owners_key()) == [kept[0].delivery_tag.encode()]  # the live one's claim stays
        assert {t.decode() for t in db.hkeys("unacked")} == {kept[0].delivery_tag}
        assert ownership.sweep(db, ttl=0) == 0  # nothing more to restore
        del held
    finally:
        dead.release()
        live.release()


def test_late_ack_of_a_cut_off_worker_keeps_the_new_claim(redis_server: RedisServer, db: redis.Redis) -> None:
    cut, rescuer = worker_connection(redis_server, "cut/1/a"), worker_connection(redis_server, "rescuer/2/b")
    try:
        publish(cut, 1)
        (first,) = reserve(cut, 1)
        assert ownership.sweep(db, ttl=0) == 1  # cut's liveness lapsed
        alive(db, "rescuer/2/b")
        (second,) = reserve(rescuer, 1)
        assert second.delivery_tag == first.delivery_tag and second.delivery_info["redelivered"]
        first.ack()  # the link comes back: the late worker acks
        record = db.hget(owners_key(), second.delivery_tag)
        assert record is not None and ownership.parse_record(record)[0] == "rescuer/2/b"
        assert db.hexists("unacked", second.delivery_tag)
        alive(db, "cut/1/a")
        cut.default_channel.qos.restore_by_tag(first.delivery_tag)  # its shutdown restore: refused
        assert db.llen(QUEUE.name) == 0
        second.ack()
        assert db.hlen(owners_key()) == 0 and db.hlen("unacked") == 0
    finally:
        cut.release()
        rescuer.release()


def test_sweep_waits_after_a_redis_restart(redis_server: RedisServer, db: redis.Redis) -> None:
    conn = worker_connection(redis_server, "w/1/a")
    try:
        publish(conn, 1)
        reserve(conn, 1)
        uptime = float(db.info("server")["uptime_in_seconds"])
        assert ownership.sweep(db, ttl=uptime + 3600) == 0  # "just restarted": owners may renew
        assert db.hlen(owners_key()) == 1
    finally:
        conn.release()


def test_liveness_refreshes_its_claim(redis_server: RedisServer, db: redis.Redis) -> None:
    keeper = ownership.Liveness(db, "gpu0@host", heartbeat_seconds=0.2).start()
    try:
        assert keeper.owner.startswith("gpu0@host/")
        ttl_ms = db.pttl(alive_key(keeper.owner))
        assert 0 < ttl_ms <= 3000
        time.sleep(0.5)  # a few refreshes
        assert db.pttl(alive_key(keeper.owner)) > 2000
    finally:
        keeper.stop()


def test_a_closed_channel_claim_lapses_and_what_redis_still_lists_comes_back(
        redis_server: RedisServer, db: redis.Redis) -> None:
    """Redis restarted from its append-only file still lists the messages a worker's dropped
    channel had: the worker lives on, but that channel's claim lapses, so they come back."""
    keeper = ownership.Liveness(db, "gpu0@host", heartbeat_seconds=0.2).start()
    options = {"visibility_timeout": 3600, **ownership.transport_options(keeper)}
    conn = Connection(redis_server.url(DB), transport=transport.SafeTransport, transport_options=options)
    other = Connection(redis_server.url(DB), transport=transport.SafeTransport, transport_options=options)
    try:
        publish(conn, 2)
        held = reserve(conn, 2)
        owner = ownership.parse_record(db.hget(owners_key(), held[0].delivery_tag) or b"")[0]
        assert owner.startswith(f"{keeper.owner}/") and db.exists(alive_key(owner))
        assert other.default_channel.farm_owner not in (owner, keeper.owner)  # a name per channel
        index = dict(db.zrange("unacked_index", 0, -1, withscores=True))
        before = db.hgetall(owners_key()), db.hgetall("unacked"), index
        conn.release()  # dropped: its messages go back, then Redis comes back as it was before
        db.delete(QUEUE.name)
        db.hset(owners_key(), mapping=before[0])
        db.hset("unacked", mapping=before[1])
        db.zadd("unacked_index", before[2])
        wait_until(lambda: db.llen(QUEUE.name) == 2, 30, "the dropped channel's messages never came back")
        assert db.exists(alive_key(keeper.owner)) and not db.exists(alive_key(owner))
        assert db.hlen(owners_key()) == 0
    finally:
        other.release()
        conn.release()
        keeper.stop()


def test_a_task_running_when_its_channel_closed_acks_through_the_process_client(
        redis_server: RedisServer, db: redis.Redis) -> None:
    """Redis restarts under a running task: Celery closes the channel the task came on and the
    task's late ack arrives afterwards. It must not raise (it stopped the worker as an
    "Unrecoverable error") and it still forgets the message, which is then not run again."""
    keeper = ownership.Liveness(db, "gpu0@host", heartbeat_seconds=0.2).start()
    options = {"visibility_timeout": 3600, **ownership.transport_options(keeper)}
    conn = Connection(redis_server.url(DB), transport=transport.SafeTransport, transport_options=options)
    try:
        publish(conn, 2)
        held = reserve(conn, 2)
        conn.default_channel.qos.restore_unacked = lambda client=None: None  # as when Redis was gone
        conn.release()  # the channel closes with both messages delivered and not yet acknowledged
        held[0].ack()
        assert db.hlen(owners_key()) == 1 and db.zcard("unacked_index") == 1  # only the first is forgotten
        wait_until(lambda: db.llen(QUEUE.name) == 1, 30, "the unacknowledged one never came back")
        time.sleep(1.0)  # a few sweeps more: the acknowledged one stays done
        assert db.llen(QUEUE.name) == 1 and db.hlen(owners_key()) == 0
    finally:
        conn.release()
        keeper.stop()
