"""``Job``: a bulk job as its user sees it; many prompts in, results out in input order.

A job is composed of its ``JobStore`` (Redis), its ``Lease`` (one sender at a time), its
``Ledger`` (the rows as this process knows them) and its ``Sender`` (the pump thread). A
resubmitted job sends the rows never sent, and the rows sent whose message is nowhere (no
stored result, in no queue, reserved by no worker: lost with a fault, such as a Redis restarted
from its append-only file without its last second); rows in flight finish from their first
message, and the worker skips a message whose id already has a stored result. So rows may run
again after a fault, never go missing, and each has one result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence, Sized
from typing import Any

from protocol.errors import ErrorCode, FarmError, RequestError
from protocol.schema import GenerationRequest, GenerationResult, Limits

from producer.connection import FarmConnection
from producer.jobs.book import CANCELLED, FAILED, JobProgress, book_from_bitmaps, check_job_id
from producer.jobs.detached import DetachedJobs
from producer.jobs.fingerprint import fingerprint_of
from producer.jobs.lease import Lease
from producer.jobs.ledger import Ledger
from producer.jobs.sender import Sender
from producer.jobs.store import FETCH, JobStore, new_info, parse_counts


class Job:
    """A bulk job: follow its progress, read results in input order, cancel or retry it.

    Made by ``FarmClient.submit_job`` (which sends rows from a background thread, at most
    ``window`` outstanding) or ``FarmClient.job`` (reattach from any process: follow, cancel, retry).
    """

    def __init__(self, connection: FarmConnection, job_id: str, window: int, limits: Limits,
                 params: dict[str, Any]) -> None:
        self.connection, self.id, self.window = connection, check_job_id(job_id), window
        self.params, self.limits = params, limits
        self.store = JobStore(connection, job_id)
        self.lease = Lease(connection, self.store.keys.producer, job_id)
        self.ledger = Ledger(job_id, window)
        self.sender = Sender(self.store, self.lease, self.ledger, window, limits, params)

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    # --- making ---------------------------------------------------------------------------------
    @classmethod
    def submit(cls, connection: FarmConnection, limits: Limits, prompts: Iterable[Any], job_id: str | None = None,
               *, total: int | None = None, window: int | None = None, fingerprint: str | None = None,
               detach: bool = False, **params: Any) -> Job:
        """Start (or resume) a job; returns once its rows are being sent in the background.

        Prompts given as a sequence are fingerprinted here; a lazy source is fingerprinted only
        if the caller passes ``fingerprint`` (``farm submit`` does, from its check of the file).
        ``detach``: the rows are stored in Redis and the farm's job runners send them (no lease
        is taken here); the job returned follows it."""
        if window is not None and window < 1:
            raise RequestError.for_field("window", f"must be at least 1, got {window}")
        _check_params(params, limits)
        if total is None and isinstance(prompts, Sized):
            total = len(prompts)
        if fingerprint is None and isinstance(prompts, Sequence):
            fingerprint = fingerprint_of(prompts, params)
        job = cls(connection, job_id or uuid.uuid4().hex[:16], window or connection.settings.job_window,
                  limits, params)
        if detach:
            return job._detach(prompts, total, fingerprint)
        job.lease.acquire()
        try:
            job._load(create=(total, fingerprint))
            job.sender.settle()
        except BaseException:
            job.lease.release()
            raise
        job.sender.feed(enumerate(prompts))
        job.sender.start()
        return job

    def _detach(self, prompts: Iterable[Any], total: int | None, fingerprint: str | None) -> Job:
        self._load(create=(total, fingerprint))
        registry = DetachedJobs(self.connection)
        stored = registry.store_rows(self.id, prompts)
        if total is not None and stored != total:
            raise RequestError.for_field("prompts", f"job {self.id} has {stored} rows stored, not {total}")
        self.store.set_total(stored)
        registry.register(self.id)
        self._load(create=None)
        return self

    @classmethod
    def resume(cls, connection: FarmConnection, limits: Limits, job_id: str) -> Job | None:
        """Pump a detached job from its stored rows if this process wins its lease (else None)."""
        job = cls(connection, job_id, connection.settings.job_window, limits, {})
        if not job.lease.try_acquire():
            return None
        try:
            job._load(create=None)
            job.sender.settle()
            with job.ledger.cond:
                start = next((i for i in range(len(job.ledger.book.states)) if job.ledger.book.untouched(i)),
                             len(job.ledger.book.states))
        except BaseException:
            job.lease.release()
            raise
        job.sender.feed(DetachedJobs(connection).rows(job_id, start))
        job.sender.start()
        return job

    @classmethod
    def attach(cls, connection: FarmConnection, limits: Limits, job_id: str) -> Job:
        """Follow a job submitted elsewhere (another process, or before a restart)."""
        job = cls(connection, job_id, connection.settings.job_window, limits, {})
        job._load(create=None)
        return job

    # --- following ------------------------------------------------------------------------------
    @property
    def total(self) -> int | None:
        return self.ledger.book.total

    def progress(self) -> JobProgress:
        """Rows done / failed / cancelled / pending, rates over the last 30 s, and the ETA."""
        if not self.sender.running:
            self.sender.sync()
        return self.ledger.progress()

    def results(self, start: int = 0, timeout: float | None = None) -> Iterator[GenerationResult]:
        """Results in input order from row ``start``, each as soon as it and the rows before it
        are finished. Cancelled rows come with ``finish_reason == "cancelled"``."""
        deadline = _deadline(timeout)
        index = start
        while True:
            count = self._wait_run(index, deadline)
            if not count:
                return
            yield from self._fetch(list(range(index, index + count)))
            index += count

    def as_completed(self, timeout: float | None = None) -> Iterator[tuple[int, GenerationResult]]:
        """``(index, result)`` pairs in the order rows finish (a retried row comes again)."""
        deadline = _deadline(timeout)
        position = 0
        while True:
            batch = self._wait_order(position, deadline)
            if not batch:
                return
            yield from zip(batch, self._fetch(batch), strict=True)
            position += len(batch)

    def wait(self, timeout: float | None = None) -> JobProgress:
        """Block until every row has a result; raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = _deadline(timeout)
        self.sender.ensure()
        with self.ledger.cond:
            while not self.ledger.book.finished:
                self._wait_step(deadline)
            return self.ledger.progress()

    # --- acting ---------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the job: unsent rows are never sent, queued rows are revoked, running rows stop at
        their next token; all of them report ``finish_reason == "cancelled"``."""
        if self.ledger.book.finished:
            return
        remote = book_from_bitmaps(self.total, *self.store.cancel())
        with self.ledger.cond:
            in_flight = remote.outstanding | self.ledger.book.outstanding
        self.sender.stop_rows(sorted(in_flight))
        self.sender.cancelled()

    def retry_failed(self) -> int:
        """Send the failed rows again (not cancelled or invalid ones); returns how many."""
        if self.ledger.cancelled:
            raise RequestError.for_field("job_id", f"job {self.id} was cancelled; submit a new job")
        if not self.sender.running:
            self.sender.sync()
        with self.ledger.cond:
            failed = self.ledger.book.indices(FAILED)
        retry = self.store.requests(failed)
        if not retry:
            return 0
        self.sender.join_exiting()  # a pump that saw the job finished would release the lease taken here
        if not self.lease.held:
            self.lease.acquire()
        rows = [i for i, _ in retry]
        self.store.reset(rows)
        self.ledger.reopen(rows)
        self.sender.requeue(list(retry))
        self.sender.start()
        return len(retry)

    def close(self) -> None:
        """Stop sending and following (rows already sent still run); releases the lease."""
        self.sender.close()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- async-friendly variants (for web servers): the blocking calls run in a thread ----------
    async def aresults(self, start: int = 0, timeout: float | None = None) -> AsyncIterator[GenerationResult]:
        iterator = self.results(start, timeout)
        while (item := await asyncio.to_thread(next, iterator, None)) is not None:
            yield item

    async def aas_completed(self, timeout: float | None = None) -> AsyncIterator[tuple[int, GenerationResult]]:
        iterator = self.as_completed(timeout)
        while (item := await asyncio.to_thread(next, iterator, None)) is not None:
            yield item

    async def wait_async(self, timeout: float | None = None) -> JobProgress:
        return await asyncio.to_thread(self.wait, timeout)

    # --- loading --------------------------------------------------------------------------------
    def _load(self, create: tuple[int | None, str | None] | None) -> None:
        """Read the job's state from Redis; ``create`` (total, fingerprint) makes a new job."""
        info, bitmaps = self.store.read()
        if not info and create is None:
            where = self.connection.settings.redacted_redis_url()
            raise RequestError.for_field("job_id", f"no job {self.id!r} in Redis at {where} "
                                         "(never submitted, or expired)")
        if not info and create is not None:
            info = new_info(self.params, *create)
            self.store.create(info)
        elif create is not None:
            self._check_same(info, *create)
        total = int(info["total"])
        self.params = json.loads(info["params"])
        cancelled = info.get("state") == "cancelled"
        book = book_from_bitmaps(total if total >= 0 else None, *bitmaps)
        handed = len(book.states)
        if cancelled:
            book.cancel_unsent(handed)
        tokens, last_result = parse_counts([info.get("tokens"), info.get("last_result")])
        self.ledger.reload(book, float(info.get("created") or time.time()), cancelled, tokens, last_result)
        self.sender.loaded(self.params)

    def _check_same(self, info: dict[str, str], total: int | None, fingerprint: str | None) -> None:
        """A resubmission must be the same job: same parameters, rows and prompts."""
        if json.loads(info["params"]) != json.loads(json.dumps(self.params)):
            raise RequestError.for_field("job_id", f"job {self.id} exists with other parameters "
                                         f"({info['params']}); use another job id")
        stored = int(info["total"])
        if total is not None and stored >= 0 and stored != total:
            raise RequestError.for_field("job_id", f"job {self.id} has {stored} rows, not {total}; use another job id")
        known = info.get("fingerprint")
        if known and not fingerprint:
            raise RequestError.for_field("job_id", f"job {self.id} exists; prompts given lazily cannot be told "
                                         "the same as its own: pass them as a list (or fingerprint=) to resume it")
        if known and known != fingerprint:
            raise RequestError.for_field("job_id", f"job {self.id} was submitted with other prompts; "
                                         "use another job id")

    # --- waiting and reading --------------------------------------------------------------------
    def _wait_step(self, deadline: float | None) -> None:
        """One bounded wait on the condition (lock held); raises the pump's error or a timeout."""
        if self.ledger.error is not None:
            raise self.ledger.error
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"job {self.id} not finished after the timeout ({self.ledger.progress().summary()})")
        if not self.sender.running:
            self.sender.start()
        self.ledger.cond.wait(0.5 if remaining is None else min(0.5, remaining))

    def _wait_run(self, index: int, deadline: float | None) -> int:
        """Rows from ``index`` that are finished, waiting until there is at least one (0: the end)."""
        self.sender.ensure()
        with self.ledger.cond:
            while True:
                book = self.ledger.book
                if book.total is not None and index >= book.total:
                    return 0
                count = book.ready_run(index, FETCH)
                if count:
                    return count
                self._wait_step(deadline)

    def _wait_order(self, position: int, deadline: float | None) -> list[int]:
        self.sender.ensure()
        with self.ledger.cond:
            while True:
                book = self.ledger.book
                if position < len(book.order):
                    return list(book.order[position:position + FETCH])
                if book.finished and not self.sender.busy:
                    return []
                self._wait_step(deadline)

    def _fetch(self, rows: list[int]) -> list[GenerationResult]:
        """Results of finished rows: from the ledger's cache, else from Redis."""
        found = self.ledger.cached(rows)
        missing = [i for i in rows if i not in found]
        for index, result in self.store.results(missing):
            found[index] = result or self._absent(index)
        return [found[i] for i in rows]

    def _absent(self, index: int) -> GenerationResult:
        """A finished row without a stored result: cancelled before it was sent, or expired."""
        task_id = self.store.task_id(index)
        if self.ledger.book.states[index] & 3 == CANCELLED:
            return GenerationResult(id=task_id, finish_reason="cancelled")
        return GenerationResult.failed(task_id, FarmError(ErrorCode.INTERNAL, (
            f"the result of {task_id} is no longer in Redis (results expire after "
            f"{self.connection.settings.result_expires}s)")))


def _check_params(params: dict[str, Any], limits: Limits) -> None:
    """Job-wide parameters are checked once, before anything is created or sent."""
    for name in ("prompt", "messages"):
        if name in params:
            raise RequestError.for_field(name, "give prompts as the rows of the job, not as a job parameter")
    if "model" not in params:  # the rows may name their models: each row is checked when sent
        limits = dataclasses.replace(limits, models=None, default_model=None)
    GenerationRequest.from_dict({**params, "prompt": "x"}, limits)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout
