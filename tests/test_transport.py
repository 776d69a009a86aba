"""The hardened Redis transport (worker/transport.py) on a real Redis: a popped message is recorded
as unacknowledged in the same atomic step, so a worker that dies right after the pop (before
kombu's own bookkeeping runs) loses nothing; the message comes back intact after the visibility
timeout."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue

from tests.conftest import RedisServer
from worker import transport

pytestmark = pytest.mark.integration

QUEUE = Queue("transport-test", Exchange("transport-test"), routing_key="transport-test")


@pytest.fixture
def connection(redis_server: RedisServer) -> Iterator[Connection]:
    redis_server.client("transport").flushdb()
    conn = Connection(redis_server.url("transport"), transport=transport.SafeTransport,
                      transport_options={"visibility_timeout": 1})
    yield conn
    conn.release()


def publish(conn: Connection, payloads: list[dict[str, Any]]) -> None:
    with conn.Producer(serializer="json") as producer:
        for payload in payloads:
            producer.publish(payload, exchange=QUEUE.exchange, routing_key=QUEUE.routing_key, declare=[QUEUE])


def drain_until(conn: Connection, done: Callable[[], bool], callbacks: list[Any]) -> None:
    """Consume from ``QUEUE`` (synchronously, no event loop) until ``done()``, at most 10 s."""
    with conn.Consumer(QUEUE, callbacks=callbacks, accept=["json"]):
        deadline = time.monotonic() + 10
        while not done() and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.5)
            except TimeoutError:
                pass


def pop_and_die(conn: Connection) -> list[dict[str, Any]]:
    """Consume as a worker does, but "die" the moment a message arrives: kombu's own
    ``qos.append`` (its unacked record) never runs, as when SIGKILL lands right after the pop."""
    seen: list[dict[str, Any]] = []
    conn.default_channel.connection._deliver = lambda message, queue: seen.append(message)  # no qos.append
    drain_until(conn, lambda: bool(seen), [])
    return seen


def test_popped_message_is_unacked_atomically_and_restored_intact(connection: Connection,
                                                                   redis_server: RedisServer) -> None:
    publish(connection, [{"n": 1, "text": "ünïcode [] {} 1.0000000000000002"}])
    seen = pop_and_die(connection)
    assert len(seen) == 1
    db = redis_server.client("transport")
    assert db.llen(QUEUE.name) == 0  # it left the queue...
    tag = seen[0]["properties"]["delivery_tag"]
    assert db.zscore("unacked_index", tag) is not None  # ...and is recorded for redelivery
    stored, exchange, routing_key = json.loads(db.hget("unacked", tag))
    assert stored == seen[0]  # stored as sent, byte for byte after json
    assert (exchange, routing_key) == (QUEUE.exchange.name, QUEUE.routing_key)

    time.sleep(1.2)  # past the visibility timeout
    fresh = Connection(redis_server.url("transport"), transport=transport.SafeTransport,
                       transport_options={"visibility_timeout": 1})
    try:
        fresh.default_channel.qos.restore_visible(num=None, interval=1)
        assert db.llen(QUEUE.name) == 1
        with fresh.SimpleQueue(QUEUE) as queue:
            message = queue.get(timeout=5)
            assert message.payload == {"n": 1, "text": "ünïcode [] {} 1.0000000000000002"}
            assert message.headers.get("redelivered") is True
            message.ack()
    finally:
        fresh.release()


def test_malformed_item_is_returned_unrecorded(connection: Connection, redis_server: RedisServer) -> None:
    db = redis_server.client("transport")
    publish(connection, [{"n": 0}])  # declares the queue and its binding
    db.delete(QUEUE.name)
    db.lpush(QUEUE.name, b"{this is not json")
    channel = connection.default_channel
    drain_until(connection, lambda: not db.llen(QUEUE.name), [lambda body, message: message.ack()])
    assert db.llen(QUEUE.name) == 0  # consumed and dropped with a log line, the consumer alive
    assert db.hlen("unacked") == 0 and db.zcard("unacked_index") == 0
    assert channel._atomic_pop  # the script kept working
