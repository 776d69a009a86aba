"""The sender: a background thread (the pump) that keeps a job's window full and records what
finished.

Each step sends rows while fewer than ``window`` are outstanding (when this process holds the
lease), then reads the results of the rows outstanding, records them in Redis and in the
``Ledger``, and keeps the lease. A process that only follows a job (no lease) runs the same pump,
which then only observes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery

from protocol.errors import FarmError, FarmUnavailable, RequestError
from protocol.celery_app import celery_queue
from protocol.names import BULK_QUEUE, GENERATE_TASK, model_queue
from protocol.schema import GenerationRequest, GenerationResult, Limits

from producer.connection import FarmConnection, as_text
from producer.jobs.book import book_from_bitmaps, outcome
from producer.jobs.lease import Lease
from producer.jobs.ledger import Ledger
from producer.jobs.store import Chunk, JobStore, parse_counts

CHUNK = 32
"""Rows enqueued between two bookkeeping round trips."""
POLL_SECONDS = 0.05
REFRESH_SECONDS = 1.0
"""How often a job followed from another process re-reads which rows were sent."""
OUTAGE_SECONDS = 60.0
"""A job keeps trying this long when Redis stops answering, then fails."""
AUDIT_SECONDS = 10.0
"""A job with rows outstanding and none finished for this long looks for rows lost (``recover``)."""

log = logging.getLogger(__name__)


class Sender:
    """Sends one job's rows from ``feed``'s prompts and observes their results, in a thread."""

    def __init__(self, store: JobStore, lease: Lease, ledger: Ledger, window: int, limits: Limits,
                 params: dict[str, Any]) -> None:
        self.store, self.lease, self.ledger = store, lease, ledger
        self.connection: FarmConnection = store.connection
        self.window, self.limits, self.params = window, limits, params
        self._source: Iterator[tuple[int, Any]] | None = None
        with ledger.cond:
            self._handed = len(ledger.book.states)
        self._retry: Chunk = []
        self._unsettled: Chunk = []
        self._pump: threading.Thread | None = None
        self._exiting = False  # the pump saw every row finished and is on its way out (under ledger.cond)
        self._closing = threading.Event()
        self._app: Celery | None = None
        self._refreshed = 0.0
        self._audit_at = 0.0
        """When to look for rows lost next: at once (a resumed job), then after ``AUDIT_SECONDS``
        without a row finishing, and after an outage."""

    # --- driving ------------------------------------------------------------------------------
    def feed(self, source: Iterator[tuple[int, Any]]) -> None:
        """The prompts to send, as ``(index, row)``; rows already sent or finished are skipped."""
        self._source = source

    def loaded(self, params: dict[str, Any]) -> None:
        """The ledger was read from Redis: its rows count as handed out; the job's parameters."""
        self.params = params
        with self.ledger.cond:
            self._handed = len(self.ledger.book.states)

    def requeue(self, rows: Chunk) -> None:
        """Rows to send again (a retry), before any new one."""
        with self.ledger.cond:
            self._retry.extend(rows)

    @property
    def running(self) -> bool:
        """A pump runs that will still send (one on its way out after the last row does not count)."""
        return self._pump is not None and self._pump.is_alive() and not self._exiting

    def join_exiting(self) -> None:
        """Wait for a pump on its way out (it releases the lease as it goes), so a retry starts a fresh one."""
        pump = self._pump
        if pump is not None and self._exiting and pump is not threading.current_thread():
            pump.join(10)

    @property
    def busy(self) -> bool:
        """Rows wait to be sent again."""
        with self.ledger.cond:
            return bool(self._retry)

    def start(self) -> None:
        self.join_exiting()
        with self.ledger.cond:
            if self.running:
                return
            self._exiting = False
            self._closing.clear()
            self._pump = threading.Thread(target=self._run, name=f"job-{self.store.job_id}", daemon=True)
            self._pump.start()

    def ensure(self) -> None:
        """Start the pump unless it runs or the job is finished."""
        if not self.running and not self.ledger.book.finished:
            self.start()

    def close(self) -> None:
        """Stop the pump (rows already sent still run) and release the lease."""
        self._closing.set()
        if self._pump is not None and self._pump is not threading.current_thread():
            self._pump.join(10)
        self.lease.release()

    def sync(self) -> None:
        """One look at Redis for a job no pump follows in this process."""
        self._refreshed = 0.0
        self.observe()

    def cancelled(self) -> None:
        """The job was cancelled (here or elsewhere): nothing more is sent, unsent rows are cancelled."""
        with self.ledger.cond:
            self.ledger.cancelled = True
            self._source = None
            self._retry.clear()
            self.ledger.book.cancel_unsent(self._handed)
            self.ledger.cond.notify_all()
            total = self.ledger.book.total
        self.store.set_total(total if total is not None else self._handed)

    def stop_rows(self, rows: list[int]) -> None:
        self.connection.cancel([self.store.task_id(i) for i in rows])

    # --- the pump -----------------------------------------------------------------------------
    def _run(self) -> None:
        outage: float | None = None
        try:
            while not self._closing.is_set():
                try:
                    if self._step():
                        break
                    if outage is not None:  # Redis is back: it may have lost writes (its last second)
                        self._audit_at = 0.0
                    outage = None
                except FarmUnavailable:  # ride out a short Redis outage (a restart, a failover)
                    outage = outage or time.monotonic()
                    if time.monotonic() - outage > OUTAGE_SECONDS:
                        raise
                    self._closing.wait(1.0)
            self._mark_finished()
        except BaseException as error:  # noqa: BLE001 - handed to the threads that follow the job
            self.ledger.error = error
        finally:
            self.lease.release()
            with self.ledger.cond:
                self.ledger.cond.notify_all()

    def _step(self) -> bool:
        """Send what the window allows, record what finished; True once every row is finished."""
        if self._unsettled:
            self._resettle()
        if self.lease.held and time.monotonic() >= self._audit_at:
            self.recover()
        sent = self._fill_window()
        changed = self.observe()
        with self.ledger.cond:
            if self.ledger.book.finished and not self._retry:
                self._exiting = True  # decided under the lock that requeue() takes: a retry sees it
                return True
        if not (sent or changed):
            self._closing.wait(POLL_SECONDS)
        return False

    def _mark_finished(self) -> None:
        with self.ledger.cond:
            done = self.ledger.book.finished and not self.ledger.cancelled
        if done:
            self.store.set_state("finished")

    def settle(self) -> None:
        """Rows a killed producer left in ``sending``: those whose message made it count as sent."""
        sent = self.store.settle_sending()
        with self.ledger.cond:
            for index in sent:
                self.ledger.book.mark_sent(index)

    def _resettle(self) -> None:
        """After a failure in the middle of a chunk: rows whose message did not make it go again."""
        self.settle()
        with self.ledger.cond:
            again = [(i, r) for i, r in self._unsettled if self.ledger.book.untouched(i)]
            self._retry[:0] = again
            self._unsettled = []

    def recover(self) -> int:
        """Send again the rows sent whose message is nowhere (no result, no queue, no worker),
        whatever lost them; returns how many. Their stored requests go first; a row without one
        goes back to unsent, and the prompts fed (a resubmission) send it."""
        self._audit_at = time.monotonic() + AUDIT_SECONDS
        with self.ledger.cond:
            if self.ledger.cancelled:
                return 0
            rows = sorted(self.ledger.book.outstanding)
        lost = self.store.lost(rows)
        if not lost:
            return 0
        log.warning("job %s: %d row(s) sent but neither finished, queued nor held by a worker (lost "
                    "with a Redis restart?); sending them again", self.store.job_id, len(lost))
        again = self.store.requests(lost)
        with self.ledger.cond:
            for index in set(lost) - {i for i, _ in again}:
                self.ledger.book.reopen(index)
            self._retry.extend(again)
        return len(lost)

    # --- sending ------------------------------------------------------------------------------
    def _fill_window(self) -> int:
        """Send rows while fewer than ``window`` are outstanding; returns how many were sent."""
        sent = 0
        while not self.ledger.cancelled and self.lease.held:
            with self.ledger.cond:
                room = min(CHUNK, self.window - len(self.ledger.book.outstanding))
            chunk = self._next_rows(room) if room > 0 else []
            if not chunk:
                return sent
            self._send_chunk(chunk)
            sent += len(chunk)
        return sent

    def _next_rows(self, count: int) -> Chunk:
        with self.ledger.cond:
            chunk: Chunk = list(self._retry[:count])
            del self._retry[:count]
        while len(chunk) < count and self._source is not None:
            try:
                index, row = next(self._source)
            except StopIteration:
                self._source_ended()
                break
            self._handed = index + 1
            if self.ledger.book.untouched(index):
                chunk.append((index, self._prepare(index, row)))
        return chunk

    def _prepare(self, index: int, row: Any) -> dict[str, Any] | FarmError:
        data = row  # not a string or a dict: ``from_dict`` names the problem
        if isinstance(row, str):
            data = {**self.params, "prompt": row}
        elif isinstance(row, dict):
            data = {**self.params, **row}
        try:
            return GenerationRequest.from_dict(data, self.limits).to_dict()
        except RequestError as error:
            return RequestError(error.code, f"row {index}: {error.message}")

    def _source_ended(self) -> None:
        self._source = None
        with self.ledger.cond:
            book = self.ledger.book
            if book.total is not None and book.total != self._handed:
                raise RequestError.for_field("prompts", f"job {self.store.job_id} has {book.total} rows, "
                                             f"but the prompts given have {self._handed}")
            if book.total is None:
                book.set_total(self._handed)
        self.store.set_total(self._handed)

    def _send_chunk(self, chunk: Chunk) -> None:
        """Enqueue rows, recording them in ``sending`` first and in ``sent`` after."""
        now = time.time()
        rows = [i for i, _ in chunk]
        self._unsettled = chunk  # until recorded as sent; see _resettle
        with self.connection.reachable():
            self.store.before_send(chunk, now)
            for index, request in chunk:
                self._send_row(index, request, now)
            pipe = self.store.pipeline()
            self.store.mark_sent(rows, pipeline=pipe)
            self.store.state(pipeline=pipe)
            state = pipe.execute()[-1]
        self._unsettled = []
        with self.ledger.cond:
            for index in rows:
                self.ledger.book.mark_sent(index)
        if as_text(state or b"") == "cancelled":  # cancelled elsewhere while this chunk was sent
            self.stop_rows(rows)
            self.cancelled()

    def _send_row(self, index: int, request: dict[str, Any] | FarmError, now: float) -> None:
        task_id = self.store.task_id(index)
        if isinstance(request, FarmError):  # an invalid row fails alone, recorded like a worker failure
            self.connection.store_failure(task_id, request)
            return
        meta = {"submitted_at": now, "job": self.store.job_id, "index": index}
        if self._app is None:
            self._app = self.connection.sender_app()
        queue = model_queue(BULK_QUEUE, request.get("model"))  # rows of one job may be for several models
        self._app.send_task(GENERATE_TASK, kwargs={"request": request, "meta": meta}, task_id=task_id,
                            queue=celery_queue(queue), routing_key=queue)

    # --- observing ----------------------------------------------------------------------------
    def observe(self) -> bool:
        """Read the results of outstanding rows and record them; True if any finished."""
        with self.ledger.cond:
            rows = sorted(self.ledger.book.outstanding)
        if not self.lease.held and time.monotonic() - self._refreshed > REFRESH_SECONDS:
            rows = self._refresh_sent()
        finished = [(i, r) for i, r in self.store.results(rows) if r is not None]
        if finished:
            self._audit_at = time.monotonic() + AUDIT_SECONDS
        state = self._record(finished)
        if state == "cancelled" and not self.ledger.cancelled:
            self.stop_rows(rows)
            self.cancelled()
        self.ledger.record(finished)
        return bool(finished)

    def _refresh_sent(self) -> list[int]:
        """Rows another process sent since this one last looked (a job followed, not sent here),
        and rows it already finished that this one never saw in flight (they ran between two looks)."""
        self._refreshed = time.monotonic()
        info, bitmaps = self.store.read()
        with self.ledger.cond:
            if not info:
                return sorted(self.ledger.book.outstanding)
            total = int(info["total"])
            if total >= 0 and self.ledger.book.total is None:
                self.ledger.book.set_total(total)
            remote = book_from_bitmaps(None, *bitmaps)
            local = self.ledger.book
            unseen = [i for i in remote.order if i >= len(local.states) or not local.states[i] & 3]
            for index in [*remote.outstanding, *unseen]:
                local.mark_sent(index)
            return sorted(local.outstanding)

    def _record(self, finished: list[tuple[int, GenerationResult]]) -> str:
        """Write outcomes to the job's bitmaps and keep the lease; returns the job's state
        (another process may have cancelled it)."""
        with self.connection.reachable():
            pipe = self.store.pipeline()
            self.store.state(pipeline=pipe)
            if self.lease.held:
                self.lease.refresh(pipe)
            self.store.record([(i, outcome(r), r.completion_tokens) for i, r in finished], pipeline=pipe)
            replies = pipe.execute()
        if self.lease.held:
            self.lease.keep(replies[1])
        self.ledger.counted(*parse_counts(replies[-1]))
        return as_text(replies[0] or b"")
