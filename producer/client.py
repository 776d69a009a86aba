"""``FarmClient``: submit requests to the farm, stream their text, wait for results, cancel.

Light on purpose: celery, redis and the protocol package only (no torch), so that any machine,
web server or notebook can be a client.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from kombu.exceptions import OperationalError

from protocol.celery_app import make_celery
from protocol.errors import ErrorCode, FarmError, FarmUnavailable, RequestError
from protocol.names import (GENERATE_TASK, HEARTBEAT_PATTERN, INTERACTIVE_QUEUE, QUEUES,
                            cancel_key, stream_key, submitted_key)
from protocol.schema import GenerationRequest, GenerationResult, Limits
from protocol.redis_conn import connect
from protocol.settings import FarmSettings

if TYPE_CHECKING:
    from producer.jobs import Job

READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")
CLIENT_RETRIES = 3
"""A call retries about 1 s of Redis downtime before reporting it unreachable (a user waits)."""
OUTAGE_GRACE = 60.0
"""A request already submitted waits this long for Redis to come back (a restart)."""


@dataclass
class RequestStatus:
    """Where a request stands: ``queued``, ``running``, ``done``, ``failed``, ``cancelled`` or
    ``unknown`` (never submitted through a client, or expired)."""

    state: str
    worker: str | None = None
    batch_size: int | None = None
    text: str = ""
    finish_reason: str | None = None
    error: dict[str, str] | None = None
    queue_depth: int | None = None


class FarmClient:
    """A connection to one farm (its Redis). Thread-safe; share one per process."""

    def __init__(self, redis_url: str | None = None, settings: FarmSettings | None = None) -> None:
        base = settings or FarmSettings.from_env()
        self.settings = dataclasses.replace(base, redis_url=redis_url or base.redis_url)
        self.app = make_celery(self.settings, name="batchfarm-client")
        self.redis = connect(self.settings.redis_url, retries=CLIENT_RETRIES, settings=self.settings)

    # --- submitting ---------------------------------------------------------------------------
    def validate(self, prompt: str | None = None, **params: Any) -> GenerationRequest:
        """The request as the worker will see it; raises ``RequestError`` naming the field."""
        data = {**params, "prompt": prompt} if prompt is not None else dict(params)
        return GenerationRequest.from_dict(data, self.limits())

    def submit(self, prompt: str | None = None, *, queue: str = INTERACTIVE_QUEUE,
               request_id: str | None = None, **params: Any) -> RequestHandle:
        """Validate and enqueue one request; returns at once with a handle to follow it."""
        request = self.validate(prompt, **params)
        return self.send(request, queue=queue, request_id=request_id)

    def send(self, request: GenerationRequest, *, queue: str = INTERACTIVE_QUEUE,
             request_id: str | None = None, extra_meta: dict[str, Any] | None = None) -> RequestHandle:
        """Enqueue an already validated request."""
        if queue not in QUEUES:
            raise RequestError.for_field("queue", f"must be one of {', '.join(QUEUES)}")
        request_id = request_id or uuid.uuid4().hex
        meta = {"submitted_at": time.time(), **(extra_meta or {})}
        with self._reachable():
            self.redis.set(submitted_key(request_id), json.dumps(meta), ex=self.settings.result_expires)
            self.app.send_task(GENERATE_TASK, kwargs={"request": request.to_dict(), "meta": meta},
                               task_id=request_id, queue=queue, routing_key=queue)
        return RequestHandle(self, request_id)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                 **params: Any) -> GenerationResult:
        """Submit and wait: the result of one request."""
        return self.submit(prompt, **params).result(timeout)

    def handle(self, request_id: str) -> RequestHandle:
        """Follow a request submitted elsewhere."""
        return RequestHandle(self, request_id)

    # --- bulk jobs (producer/jobs.py) ---------------------------------------------------------
    def submit_job(self, prompts: Iterable[Any], job_id: str | None = None, *, total: int | None = None,
                   window: int | None = None, fingerprint: str | None = None, **params: Any) -> Job:
        """Run many prompts (strings, or dicts with ``prompt``/``messages`` and per-row params) on
        the ``bulk`` queue, at most ``window`` (``FARM_JOB_WINDOW``) outstanding; row ``i`` is task
        ``<job_id>:<i>``. Resubmitting a job id sends only the rows never sent."""
        from producer.jobs import Job

        return Job.submit(self, prompts, job_id, total=total, window=window, fingerprint=fingerprint, **params)

    def job(self, job_id: str) -> Job:
        """Reattach to a job submitted by any process: progress, results, cancel, retry."""
        from producer.jobs import Job

        return Job.attach(self, job_id)

    # --- the farm's state ---------------------------------------------------------------------
    def limits(self) -> Limits:
        """Request limits; adapters are those the online workers offer (unknown if none)."""
        adapters: set[str] = set()
        for worker in self.workers():
            adapters.update(worker.get("adapters", []))
        return Limits.from_settings(self.settings, sorted(adapters) if adapters else None)

    def workers(self) -> list[dict[str, Any]]:
        """Heartbeat records of the workers online."""
        with self._reachable():
            keys = sorted(self.redis.scan_iter(match=HEARTBEAT_PATTERN, count=100))
            values = self.redis.mget(keys) if keys else []
        return [json.loads(v) for v in values if v]

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting in each queue (not yet reserved by a worker)."""
        with self._reachable():
            pipe = self.redis.pipeline(transaction=False)
            for queue in QUEUES:
                pipe.llen(queue)
            return dict(zip(QUEUES, (int(n) for n in pipe.execute()), strict=True))

    def ping(self) -> None:
        """Raise ``FarmUnavailable`` (with the URL and what to start) if Redis does not answer."""
        with self._reachable():
            self.redis.ping()

    def cancel(self, request_id: str) -> None:
        """Stop a request: a queued one never runs, a running one stops at its next token."""
        with self._reachable():
            self.redis.set(cancel_key(request_id), "1", ex=self.settings.result_expires)
        self.app.control.revoke(request_id)

    # --- reading results ----------------------------------------------------------------------
    def task_meta(self, request_id: str) -> dict[str, Any]:
        with self._reachable():
            return dict(self.app.backend.get_task_meta(request_id))

    def read_events(self, request_id: str, after: str = "0", block_ms: int | None = None,
                    ) -> list[tuple[str, dict[str, Any]]]:
        """Stream events after ``after``: ``[(event_id, {"type": ..., ...})]``."""
        with self._reachable():
            reply: Any = self.redis.xread({stream_key(request_id): after}, block=block_ms, count=1000)
        if not reply:
            return []
        return [(_text(eid), json.loads(fields[b"event"])) for eid, fields in reply[0][1]]

    def _reachable(self) -> _Reachable:
        return _Reachable(self.settings)


class _Reachable:
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


class RequestHandle:
    """One submitted request: its id, status, partial text and result."""

    def __init__(self, client: FarmClient, request_id: str) -> None:
        self.client = client
        self.id = request_id

    def __repr__(self) -> str:
        return f"RequestHandle({self.id!r})"

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the result; raises ``TimeoutError`` after ``timeout`` seconds. A Redis outage
        shorter than ``OUTAGE_GRACE`` seconds (a restart) is waited out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = _Cursor()
        outage = _Outage()
        while True:
            remaining = _remaining(deadline)
            try:
                result = self._poll(cursor, remaining)
            except FarmUnavailable as error:
                outage.wait_or_raise(error)
                continue
            outage.clear()
            if result is not None:
                return result
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"request {self.id} not finished after {timeout}s")

    def _poll(self, cursor: _Cursor, remaining: float | None) -> GenerationResult | None:
        meta = self.client.task_meta(self.id)
        if meta.get("status") in READY_STATES:
            return result_from_meta(self.id, meta)
        if cursor.ended:  # the end event precedes Celery's stored result by a moment
            time.sleep(0.005)
            return None
        # Block on the request's stream: the worker's next event wakes us.
        events = self.client.read_events(self.id, cursor.after, block_ms=_block_ms(remaining))
        if events:
            cursor.after = events[-1][0]
            cursor.ended = any(e["type"] == "end" for _, e in events)
        return None

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """Text deltas as the worker generates them; their concatenation is the final text."""
        for event in self.events(timeout):
            if event["type"] == "delta" and event.get("text"):
                yield str(event["text"])

    def events(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """All stream events (start, delta, end); ends after ``end`` or when the task is over."""
        deadline = None if timeout is None else time.monotonic() + timeout
        after = "0"
        while True:
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"request {self.id} not finished after {timeout}s")
            events = self.client.read_events(self.id, after, block_ms=_block_ms(remaining))
            for event_id, event in events:
                after = event_id
                yield event
                if event["type"] == "end":
                    return
            if not events and self.client.task_meta(self.id).get("status") in READY_STATES:
                return  # finished without a stream: refused before it reached the engine

    def status(self) -> RequestStatus:
        """Queued, running (on which worker, in a batch of how many), done, failed or cancelled."""
        meta = self.client.task_meta(self.id)
        if meta.get("status") in READY_STATES:
            result = result_from_meta(self.id, meta)
            state = {"stop": "done", "length": "done", "cancelled": "cancelled"}.get(result.finish_reason, "failed")
            return RequestStatus(state, result.worker or None, result.batch_size or None, result.text,
                                 result.finish_reason, result.error)
        return self._live_status()

    def _live_status(self) -> RequestStatus:
        events = self.client.read_events(self.id)
        starts = [e for _, e in events if e["type"] == "start"]
        text = "".join(str(e.get("text", "")) for _, e in events if e["type"] == "delta")
        if starts:
            return RequestStatus("running", starts[-1].get("worker"), starts[-1].get("batch_size"), text)
        with self.client._reachable():
            known = self.client.redis.exists(submitted_key(self.id))
        if not known:
            return RequestStatus("unknown")
        return RequestStatus("queued", queue_depth=sum(self.client.queue_depths().values()))

    def cancel(self) -> None:
        self.client.cancel(self.id)


@dataclass
class _Cursor:
    after: str = "0"
    ended: bool = False


class _Outage:
    """How long Redis has been unreachable while we wait for a result."""

    def __init__(self) -> None:
        self.since: float | None = None

    def wait_or_raise(self, error: FarmUnavailable) -> None:
        now = time.monotonic()
        self.since = self.since or now
        if now - self.since > OUTAGE_GRACE:
            raise error
        time.sleep(0.5)

    def clear(self) -> None:
        self.since = None


def result_from_meta(request_id: str, meta: dict[str, Any]) -> GenerationResult:
    """A Celery result record as a ``GenerationResult`` (failures and revocations included)."""
    status, value = meta.get("status"), meta.get("result")
    if status == "SUCCESS" and isinstance(value, dict):
        return GenerationResult.from_dict(value)
    if status == "REVOKED":
        return GenerationResult(id=request_id, finish_reason="cancelled")
    if isinstance(value, FarmError):
        return GenerationResult.failed(request_id, value)
    message = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else str(value)
    return GenerationResult.failed(request_id, FarmError(ErrorCode.INTERNAL, message))


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _block_ms(remaining: float | None) -> int:
    return 1000 if remaining is None else max(1, min(1000, int(remaining * 1000)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
