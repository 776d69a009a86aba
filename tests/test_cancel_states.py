"""A cancelled request ends in Celery's ``REVOKED`` state, in the result backend and in the
events Flower reads, while its result (the text and tokens so far) still reads back; a request
that finishes is ``SUCCESS`` in both."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery.result import AsyncResult
from flower.events import EventsState

from producer import FarmClient
from producer.connection import FarmConnection, result_from_meta
from protocol.errors import ErrorCode, FarmError
from protocol.names import duplicates_key
from protocol.results import cancelled_error
from protocol.settings import FarmSettings
from tests.conftest import RedisServer, wait_until

pytestmark = pytest.mark.integration


@contextmanager
def flower_state(client: FarmClient) -> Iterator[EventsState]:
    """Flower's own state (``EventsState``), fed the farm's Celery events as Flower's events
    thread feeds it, from before the test's requests are sent until they are over."""
    state, seen = EventsState(), threading.Event()
    lock = threading.Lock()

    def on_event(event: dict[str, Any]) -> None:
        with lock:
            state.event(event)
        seen.set()

    with client.app.connection() as conn:
        receiver = client.app.events.Receiver(conn, handlers={"*": on_event})
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "wakeup": True}, daemon=True)
        thread.start()
        try:
            # Subscribed once an event arrives: the workers answer the wakeup with a heartbeat.
            assert seen.wait(30), "no Celery event within 30 s"
            yield state
        finally:
            receiver.should_stop = True
            thread.join(10)


def flower_task_state(state: EventsState, task_id: str) -> str | None:
    task = state.tasks.get(task_id)
    return None if task is None else str(task.state)


def test_a_cancelled_request_is_revoked_in_the_backend_and_in_flower(client: FarmClient) -> None:
    with flower_state(client) as state:
        victim = client.submit("Revoke me", max_new_tokens=1024, ignore_eos=True)
        finished = client.submit("Let me finish", max_new_tokens=8)
        assert next(e for e in victim.events(timeout=60) if e["type"] == "delta")
        victim.cancel()
        result = victim.result(timeout=30)
        assert finished.result(timeout=60).ok
        for handle, expected in ((victim, "REVOKED"), (finished, "SUCCESS")):
            wait_until(lambda h=handle, s=expected: flower_task_state(state, h.id) == s, 30,  # type: ignore[misc]
                       f"Flower's state of {handle.id} did not become {expected}")
        time.sleep(1)  # a late task-succeeded would turn Flower's REVOKED into SUCCESS: none comes
        assert flower_task_state(state, victim.id) == "REVOKED"
    assert AsyncResult(victim.id, app=client.app).state == "REVOKED"
    assert AsyncResult(finished.id, app=client.app).state == "SUCCESS"
    assert result.finish_reason == "cancelled" and 0 < result.completion_tokens < 1024 and result.text
    assert result.id == victim.id and result.worker and result.batch_size >= 1
    assert victim.status().state == "cancelled"


def test_a_request_cancelled_before_it_ran_is_revoked(client: FarmClient) -> None:
    """Cancelled while it waits behind a full batch, it never runs, whichever side stops it
    (Celery's revoke of its message, or the engine when it would join a batch)."""
    blocker = [client.submit(f"Hold the worker {i}", max_new_tokens=1024, ignore_eos=True) for i in range(16)]
    queued = client.submit("Never run me", max_new_tokens=8)
    queued.cancel()
    result = queued.result(timeout=60)
    for handle in blocker:
        handle.cancel()
    # The blockers are only cleared away: on a fast CPU the tiny model may have run them to their
    # end (1,024 tokens in ~2 s) before the queued request's cancel came back.
    assert {h.result(timeout=60).finish_reason for h in blocker} <= {"cancelled", "length"}
    assert AsyncResult(queued.id, app=client.app).state == "REVOKED"
    assert result.finish_reason == "cancelled" and result.completion_tokens == 0 and result.text == ""


def test_the_store_keeps_the_first_finished_or_cancelled_result(redis_server: RedisServer) -> None:
    """A cancel is final like a success: a later run's result does not replace it (and counts as
    a duplicate); a revoke arriving after a success changes nothing and is no duplicate; a
    failure may be replaced (a retried row)."""
    connection = FarmConnection(FarmSettings(redis_url=redis_server.url("cancel-states-store")))
    backend, db = connection.app.backend, connection.redis
    db.flushdb()
    so_far = {"id": "c", "text": "Once upon", "completion_tokens": 2, "finish_reason": "cancelled"}
    backend.store_result("c", cancelled_error(so_far), "REVOKED")
    backend.store_result("c", {"id": "c", "text": "Once upon a time", "completion_tokens": 4}, "SUCCESS")
    assert connection.task_meta("c")["status"] == "REVOKED" and int(db.get(duplicates_key()) or 0) == 1
    cancelled = result_from_meta("c", connection.task_meta("c"))
    assert (cancelled.text, cancelled.completion_tokens, cancelled.finish_reason) == ("Once upon", 2, "cancelled")
    backend.store_result("s", {"id": "s", "text": "done"}, "SUCCESS")
    backend.mark_as_revoked("s", "revoked")
    assert connection.task_meta("s")["status"] == "SUCCESS" and int(db.get(duplicates_key()) or 0) == 1
    backend.store_result("f", FarmError(ErrorCode.INTERNAL, "boom"), "FAILURE")
    backend.store_result("f", {"id": "f", "text": "retried"}, "SUCCESS")
    assert result_from_meta("f", connection.task_meta("f")).text == "retried"
    backend.mark_as_revoked("q", "revoked")  # Celery's own revoke of a queued message: nothing ran
    never = result_from_meta("q", connection.task_meta("q"))
    assert (never.finish_reason, never.text, never.completion_tokens) == ("cancelled", "", 0)
