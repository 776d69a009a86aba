"""``FarmClient``: submit requests to the farm, stream their text, wait for results, cancel.

Light on purpose: celery, redis and the protocol package only (no torch), so that any machine,
web server or notebook can be a client.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from protocol.celery_app import celery_queue
from protocol.errors import RequestError
from protocol.heartbeat import WorkerHeartbeat, read_heartbeats
from protocol.models import Catalog, ServedModel, served_models
from protocol.names import (GENERATE_TASK, HEARTBEAT_PATTERN, INTERACTIVE_QUEUE, QUEUES, model_queue, models_key,
                            submitted_key)
from protocol.schema import GenerationRequest, GenerationResult, Limits
from protocol.settings import FarmSettings

from producer.connection import (CLIENT_RETRIES, OUTAGE_GRACE, READY_STATES, Events, FarmConnection, Outage,
                                 Reachable, result_from_meta)
from producer.follow import Follower, follow
from producer.jobs import Job, JobProgress
from producer.jobs.detached import DetachedJobs
from producer.jobs.runner import JobRunner

__all__ = ["CLIENT_RETRIES", "OUTAGE_GRACE", "READY_STATES", "FarmClient", "RequestHandle", "RequestStatus",
           "result_from_meta"]


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


def final_state(finish_reason: str | None) -> str:
    """The ``RequestStatus.state`` of a request that ended for ``finish_reason``."""
    return {"stop": "done", "length": "done", "cancelled": "cancelled"}.get(finish_reason or "", "failed")


class FarmClient:
    """A connection to one farm (its Redis). Thread-safe; share one per process."""

    def __init__(self, redis_url: str | None = None, settings: FarmSettings | None = None) -> None:
        base = settings or FarmSettings.from_env()
        self.settings = dataclasses.replace(base, redis_url=redis_url or base.redis_url)
        self.connection = FarmConnection(self.settings)
        self.app = self.connection.app
        self.redis = self.connection.redis

    # --- submitting ---------------------------------------------------------------------------
    def validate(self, prompt: str | None = None, **params: Any) -> GenerationRequest:
        """The request as the worker will see it; raises ``RequestError`` naming the field (an
        unknown ``model`` with the list of those served)."""
        return _request(prompt, params, self.limits())

    def submit(self, prompt: str | None = None, *, queue: str = INTERACTIVE_QUEUE,
               request_id: str | None = None, **params: Any) -> RequestHandle:
        """Validate and enqueue one request; returns at once with a handle to follow it. An
        interactive request for a model no live worker serves raises ``NoWorkerError``."""
        catalog = self.catalog()
        request = _request(prompt, params, catalog.limits(self.settings))
        catalog.check_served(request, queue)
        return self.send(request, queue=queue, request_id=request_id)

    def send(self, request: GenerationRequest, *, queue: str = INTERACTIVE_QUEUE,
             request_id: str | None = None, extra_meta: dict[str, Any] | None = None) -> RequestHandle:
        """Enqueue an already validated request on ``queue`` (a kind) of its model."""
        if queue not in QUEUES:
            raise RequestError.for_field("queue", f"must be one of {', '.join(QUEUES)}")
        request_id = request_id or uuid.uuid4().hex
        meta = {"submitted_at": time.time(), **(extra_meta or {})}
        target = model_queue(queue, request.model)
        with self._reachable():
            self.redis.set(submitted_key(request_id), json.dumps(meta), ex=self.settings.result_expires)
            self.app.send_task(GENERATE_TASK, kwargs={"request": request.to_dict(), "meta": meta},
                               task_id=request_id, queue=celery_queue(target), routing_key=target)
        return RequestHandle(self, request_id)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                 **params: Any) -> GenerationResult:
        """Submit and wait: the result of one request."""
        return self.submit(prompt, **params).result(timeout)

    def handle(self, request_id: str) -> RequestHandle:
        """Follow a request submitted elsewhere."""
        return RequestHandle(self, request_id)

    # --- bulk jobs (producer/jobs/) ---------------------------------------------------------
    def submit_job(self, prompts: Iterable[Any], job_id: str | None = None, *, total: int | None = None,
                   window: int | None = None, fingerprint: str | None = None, detach: bool = False,
                   **params: Any) -> Job:
        """Run many prompts (strings, or dicts with ``prompt``/``messages`` and per-row params) on
        the ``bulk`` queues, at most ``window`` (``FARM_JOB_WINDOW``) outstanding; row ``i`` is task
        ``<job_id>:<i>``. Resubmitting a job id with the same prompts sends only the rows never sent;
        with other prompts (or parameters) it is refused with a ``RequestError`` naming ``job_id``.
        ``model=`` (or a row's own ``model``) routes rows to that model's queue; one job may mix
        models, and rows of a model whose workers are all down wait in its queue.

        ``detach=True`` hands the job to the farm: its rows are stored in Redis and sent by the job
        runner of any ``farm api`` process (one at a time, taken over when it dies), so the job
        goes on once this process exits; the ``Job`` returned only follows it."""
        return Job.submit(self.connection, self.limits(), prompts, job_id, total=total, window=window,
                          fingerprint=fingerprint, detach=detach, **params)

    def job(self, job_id: str) -> Job:
        """Reattach to a job submitted by any process: progress, results, cancel, retry."""
        return Job.attach(self.connection, self.limits(), job_id)

    def detached_jobs(self) -> list[JobProgress]:
        """Where each detached job not ended stands (``farm status`` lists them)."""
        progress = []
        for job_id in DetachedJobs(self.connection).ids():
            try:
                progress.append(self.job(job_id).progress())
            except RequestError:  # ended and expired since the registry was read
                continue
        return progress

    def job_runner(self) -> JobRunner:
        """A runner of detached jobs in this process (``start()`` it; ``farm api`` runs one)."""
        return JobRunner(self.connection, self.limits)

    # --- the farm's state ---------------------------------------------------------------------
    def limits(self) -> Limits:
        """Request limits; adapters are those the online workers offer (unknown if none), models
        those served now or lately, each with its adapters (unknown if none)."""
        return self.catalog().limits(self.settings)

    def models(self) -> list[ServedModel]:
        """The models served now (by at least one live worker), each with its adapters, workers
        and queues; ``ServedModel.ids()`` lists ``model`` values such as ``demo:pirate`` too."""
        return served_models(self.heartbeats())

    def catalog(self) -> Catalog:
        """What routing reads: the live workers and the models served now or lately."""
        with self._reachable():
            raw = self.redis.hvals(models_key())
        oldest = time.time() - self.settings.result_expires
        records = [m for m in map(ServedModel.parse, raw) if m is not None and m.last_seen >= oldest]
        return Catalog(tuple(self.heartbeats()), tuple(records))

    def workers(self) -> list[dict[str, Any]]:
        """Heartbeat records of the workers online, in their json form (``heartbeats()`` typed)."""
        return [beat.to_dict() for beat in self.heartbeats()]

    def heartbeats(self) -> list[WorkerHeartbeat]:
        """The workers online, by name."""
        with self._reachable():
            keys = sorted(self.redis.scan_iter(match=HEARTBEAT_PATTERN, count=100))
            values = self.redis.mget(keys) if keys else []
        return read_heartbeats(values)

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting in each queue (not yet reserved by a worker): the plain ``interactive``
        and ``bulk`` (requests that name no model), then ``interactive.<model>``, ``bulk.<model>``
        of each model served now or lately."""
        queues = [*QUEUES, *(model_queue(kind, m) for m in sorted(self.catalog().known()) for kind in QUEUES)]
        with self._reachable():
            pipe = self.redis.pipeline(transaction=False)
            for queue in queues:
                pipe.llen(queue)
            return dict(zip(queues, (int(n) for n in pipe.execute()), strict=True))

    def ping(self) -> None:
        """Raise ``FarmUnavailable`` (with the URL and what to start) if Redis does not answer."""
        with self._reachable():
            self.redis.ping()

    def cancel(self, request_id: str) -> None:
        """Stop a request: a queued one never runs, a running one stops at its next token."""
        self.connection.cancel([request_id])

    # --- reading results ----------------------------------------------------------------------
    def task_meta(self, request_id: str) -> dict[str, Any]:
        return self.connection.task_meta(request_id)

    def read_events(self, request_id: str, after: str = "0", block_ms: int | None = None) -> Events:
        """Stream events after ``after``: ``[(event_id, {"type": ..., ...})]``."""
        return self.connection.read_events(request_id, after, block_ms)

    def _reachable(self) -> Reachable:
        return self.connection.reachable()


def _request(prompt: str | None, params: dict[str, Any], limits: Limits) -> GenerationRequest:
    data = {**params, "prompt": prompt} if prompt is not None else dict(params)
    return GenerationRequest.from_dict(data, limits)


class RequestHandle:
    """One submitted request: its id, status, partial text and result."""

    def __init__(self, client: FarmClient, request_id: str) -> None:
        self.client = client
        self.id = request_id

    def __repr__(self) -> str:
        return f"RequestHandle({self.id!r})"

    def result(self, timeout: float | None = None,
               on_outage: Callable[[str], None] | None = None) -> GenerationResult:
        """Wait for the result; raises ``TimeoutError`` after ``timeout`` seconds. A Redis outage
        shorter than ``OUTAGE_GRACE`` seconds (a restart) is waited out: it is said at once (to
        ``on_outage``, else as a warning on the ``producer`` logger), and it raises
        ``FarmUnavailable`` once it outlasts the grace or ``timeout``."""
        follower = Follower(until_result=True)
        for _ in self.follow(follower, timeout, outage=self._outage(on_outage)):
            pass
        assert follower.meta is not None  # the follower is done only with the stored result
        return result_from_meta(self.id, follower.meta)

    def stream(self, timeout: float | None = None, on_outage: Callable[[str], None] | None = None) -> Iterator[str]:
        """Text deltas as the worker generates them; their concatenation is the final text."""
        for event in self.events(timeout, on_outage):
            if event["type"] == "delta" and event.get("text"):
                yield str(event["text"])

    def events(self, timeout: float | None = None,
               on_outage: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
        """All stream events (start, delta, end); ends after ``end`` or when the task is over.
        A Redis outage is ridden out and said as ``result`` does."""
        for events in self.follow(Follower(), timeout, outage=self._outage(on_outage)):
            yield from events

    def follow(self, follower: Follower, timeout: float | None = None, block_ms: int = 1000,
               outage: Outage | None = None) -> Iterator[list[dict[str, Any]]]:
        """Drive ``follower`` over this request (see ``producer.follow``)."""
        return follow(self.client.connection, self.id, follower, timeout=timeout, block_ms=block_ms, outage=outage)

    def _outage(self, notify: Callable[[str], None] | None) -> Outage:
        return Outage(where=f"Redis at {self.client.settings.redacted_redis_url()}", notify=notify)

    def status(self) -> RequestStatus:
        """Queued, running (on which worker, in a batch of how many), done, failed or cancelled."""
        meta = self.client.task_meta(self.id)
        if meta.get("status") in READY_STATES:
            result = result_from_meta(self.id, meta)
            return RequestStatus(final_state(result.finish_reason), result.worker or None, result.batch_size or None,
                                 result.text, result.finish_reason, result.error)
        return self._live_status()

    def _live_status(self) -> RequestStatus:
        """From the stream: the worker writes its ``end`` event a moment before Celery stores the
        result, and a caller whose ``stream()`` just ended must not read ``running``."""
        events = [e for _, e in self.client.read_events(self.id)]
        starts = [e for e in events if e["type"] == "start"]
        ends = [e for e in events if e["type"] == "end"]
        text = "".join(str(e.get("text", "")) for e in events if e["type"] == "delta")
        if starts and ends:
            reason = str(ends[-1].get("finish_reason"))
            return RequestStatus(final_state(reason), starts[-1].get("worker"), starts[-1].get("batch_size"), text,
                                 reason, ends[-1].get("error"))
        if starts:
            return RequestStatus("running", starts[-1].get("worker"), starts[-1].get("batch_size"), text)
        if not self.client.connection.is_submitted(self.id):
            return RequestStatus("unknown")
        return RequestStatus("queued", queue_depth=sum(self.client.queue_depths().values()))

    def cancel(self) -> None:
        self.client.cancel(self.id)
