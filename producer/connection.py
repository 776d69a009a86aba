"""``FarmConnection``: what every client of the farm stands on, its Redis and its Celery app.

``FarmClient`` and the bulk jobs both use it; neither reaches into the other. It knows Celery's
side of a request (its stored result, its revoke, its message in the broker) and the farm's keys
beside it (the stream of events, the cancel flag, the submitted record).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from protocol.celery_app import make_celery
from protocol.errors import ErrorCode, FarmError, FarmUnavailable
from protocol.names import KOMBU_UNACKED, cancel_key, stream_key, submitted_key
from protocol.redis_conn import connect
from protocol.results import result_of_revoked
from protocol.schema import GenerationResult
from protocol.settings import FarmSettings

READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")
"""Celery states of a task whose result is stored for good."""
CLIENT_RETRIES = 3
"""A call retries about 1 s of Redis downtime before reporting it unreachable (a user waits)."""
OUTAGE_GRACE = 60.0
"""A request already submitted waits this long for Redis to come back (a restart)."""
Events = list[tuple[str, dict[str, Any]]]
"""Stream events as read: ``[(event_id, {"type": ..., ...})]``."""

log = logging.getLogger(__name__)


class FarmConnection:
    """One farm's Redis and Celery app. Thread-safe; share one per process."""

    def __init__(self, settings: FarmSettings, name: str = "batchfarm-client") -> None:
        self.settings = settings
        self.app = make_celery(settings, name=name)
        self.redis = connect(settings.redis_url, retries=CLIENT_RETRIES, settings=settings)

    def reachable(self) -> Reachable:
        """``with connection.reachable():`` turns a connection failure into ``FarmUnavailable``."""
        return Reachable(self.settings)

    # --- one request --------------------------------------------------------------------------
    def task_meta(self, request_id: str) -> dict[str, Any]:
        """Celery's record of a task (``status``, ``result``); ``PENDING`` when none is stored.
        Read with this connection's short retries, not through Celery's backend, which retries a
        lost Redis for a minute in silence (``result_backend_always_retry``, for the workers)."""
        with self.reachable():
            raw = self.redis.get(self.result_key(request_id))
        if raw is None:
            return {"status": "PENDING", "result": None, "task_id": request_id}
        return dict(self.app.backend.decode_result(raw))

    def read_events(self, request_id: str, after: str = "0", block_ms: int | None = None) -> Events:
        """Stream events after ``after``, waiting up to ``block_ms`` for the first one."""
        with self.reachable():
            reply: Any = self.redis.xread({stream_key(request_id): after}, block=block_ms, count=1000)
        if not reply:
            return []
        return [(as_text(eid), json.loads(fields[b"event"])) for eid, fields in reply[0][1]]

    def is_submitted(self, request_id: str) -> bool:
        """Whether a client recorded this request (Celery reads unknown ids as ``PENDING``)."""
        with self.reachable():
            return bool(self.redis.exists(submitted_key(request_id)))

    def cancel(self, request_ids: list[str]) -> None:
        """Cancel flags (read by the worker at batch formation and at every token) and a revoke
        (a queued message is then dropped unrun)."""
        ttl = self.settings.result_expires
        for start in range(0, len(request_ids), 1000):
            part = request_ids[start:start + 1000]
            with self.reachable():
                pipe = self.redis.pipeline(transaction=False)
                for request_id in part:
                    pipe.set(cancel_key(request_id), "1", ex=ttl)
                pipe.execute()
                self.app.control.revoke(part)

    # --- results stored by Celery -------------------------------------------------------------
    def result_key(self, task_id: str) -> str:
        """The Redis key of a task's stored result."""
        return as_text(self.app.backend.get_key_for_task(task_id))

    def decode_result(self, task_id: str, raw: bytes | str | None) -> GenerationResult | None:
        """A stored result as read from ``result_key``; None while the task is not over."""
        if raw is None:
            return None
        meta = self.app.backend.decode_result(raw)
        if meta.get("status") not in READY_STATES:
            return None
        return result_from_meta(task_id, meta)

    def store_failure(self, task_id: str, error: FarmError) -> None:
        """Record a task as failed without running it (a row refused before it was sent)."""
        self.app.backend.store_result(task_id, error, "FAILURE")

    # --- the broker -----------------------------------------------------------------------------
    def broker_task_ids(self, queue: str, marker: str) -> set[str]:
        """Ids containing ``marker`` of the messages waiting in ``queue`` or reserved by a worker
        (read in one transaction: a message moving from the queue to a worker, or back, is seen
        once). A reserved message counts whatever its owner: a live one runs it, a dead one's is
        returned by a sweeper (protocol/ownership.py), one without an owner by kombu's timeout."""
        needle = marker.encode()
        with self.reachable():
            pipe = self.redis.pipeline(transaction=True)
            pipe.lrange(queue, 0, -1)
            pipe.hvals(KOMBU_UNACKED)
            waiting, reserved = pipe.execute()
        queued = [json.loads(r) for r in waiting if needle in r]
        # kombu keeps a reserved message as json ``[message, exchange, routing_key]``
        queued += [json.loads(r)[0] for r in reserved if needle in r]
        return {str(message["headers"]["id"]) for message in queued}

    def sender_app(self) -> Celery:
        """A new app without a result backend, for sending many tasks: Celery's Redis backend
        would otherwise subscribe to (and unsubscribe from) every task's result channel."""
        app = make_celery(self.settings, name="batchfarm-bulk")
        app.conf.result_backend = "disabled"
        return app


class Reachable:
    """Turns connection failures into ``FarmUnavailable`` naming the URL and the remedy."""

    def __init__(self, settings: FarmSettings) -> None:
        self.settings = settings

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        if isinstance(error, redis.ConnectionError | redis.TimeoutError | OperationalError):
            raise FarmUnavailable(ErrorCode.REDIS_UNREACHABLE, (
                f"Redis at {self.settings.redacted_redis_url()} is unreachable ({error}); start the "
                "farm with `./farm up`, or point FARM_REDIS_URL at a running Redis")) from None


class Outage:
    """How long Redis has been unreachable while we wait for a result. Says when an outage
    begins and ends, through ``notify`` (a warning on the ``producer`` logger by default): a wait
    that freezes in silence looks like a hung farm."""

    def __init__(self, grace: float = OUTAGE_GRACE, where: str = "Redis",
                 notify: Callable[[str], None] | None = None) -> None:
        self.grace, self.where = grace, where
        self.notify = notify or log.warning
        self.since: float | None = None

    def wait_or_raise(self, error: FarmUnavailable, deadline: float | None = None) -> None:
        """Wait a moment for Redis to come back; raise ``error`` once the grace or the caller's
        ``deadline`` (``time.monotonic()``) has passed."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
            self.notify(f"{self.where} is unreachable, retrying (for up to {self.grace:.0f}s)")
        if now - self.since > self.grace or (deadline is not None and now >= deadline):
            raise error
        time.sleep(0.5)

    def clear(self) -> None:
        if self.since is not None:
            self.notify(f"{self.where} is back; carrying on")
        self.since = None


def result_from_meta(request_id: str, meta: dict[str, Any]) -> GenerationResult:
    """A Celery result record as a ``GenerationResult`` (failures and revocations included)."""
    status, value = meta.get("status"), meta.get("result")
    if status == "SUCCESS" and isinstance(value, dict):
        return GenerationResult.from_dict(value)
    if status == "REVOKED":  # cancelled: with the result so far if it ran (protocol/results.py)
        ran = result_of_revoked(value)
        return GenerationResult.from_dict(ran) if ran else GenerationResult(id=request_id, finish_reason="cancelled")
    if isinstance(value, FarmError):
        return GenerationResult.failed(request_id, value)
    message = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else str(value)
    return GenerationResult.failed(request_id, FarmError(ErrorCode.INTERNAL, message))


def as_text(value: bytes | str) -> str:
    """A Redis reply as text (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else value
