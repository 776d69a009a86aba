"""Bulk jobs: many prompts in, results out in input order; windowed, resumable, cancellable.

Row ``i`` of job ``J`` is the task ``J:i`` on the ``bulk`` queue, and its result is Celery's.
Beside those results, the job's state lives in Redis so that any process can reattach to it:

- ``farm:job:J`` hash: ``total`` (-1 until a lazy source runs out), ``params``, ``created``,
  ``state`` (running, finished, cancelled), ``fingerprint`` (optional, of the prompts)
- ``farm:job:J:sent|ok|failed|cancelled``: bitmaps, one bit per row
- ``farm:job:J:rows``: index -> request json of rows in flight or failed (for ``retry_failed``)
- ``farm:job:J:sending``: the rows of the chunk being enqueued right now; a producer killed in
  the middle of a chunk leaves them there, and the next one settles them (see ``_settle_sending``)
- ``farm:job:J:producer``: the lease of the one process that sends rows

A resubmitted job sends only rows never sent: rows in flight finish from their first message,
and the worker skips a message whose id already has a stored result, so nothing runs twice.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import Celery

from protocol.celery_app import make_celery
from protocol.errors import ErrorCode, FarmError, FarmUnavailable, RequestError
from protocol.names import BULK_QUEUE, GENERATE_TASK, cancel_key, job_key, stream_key, submitted_key
from protocol.schema import GenerationRequest, GenerationResult, Limits

from producer.client import READY_STATES, result_from_meta

if TYPE_CHECKING:
    from producer.client import FarmClient

PENDING, OK, FAILED, CANCELLED = 0, 1, 2, 3
"""A row's outcome, in the low two bits of its state byte."""
SENT = 4
"""Flag bit: the row's message was enqueued (or its failure stored)."""
KINDS = {OK: "ok", FAILED: "failed", CANCELLED: "cancelled"}
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CHUNK = 32
"""Rows enqueued between two bookkeeping round trips."""
FETCH = 512
"""Results read from Redis in one MGET."""
POLL_SECONDS = 0.05
LEASE_SECONDS = 10
REFRESH_SECONDS = 1.0
"""How often a job followed from another process re-reads which rows were sent."""
OUTAGE_SECONDS = 60.0
"""A job keeps trying this long when Redis stops answering, then fails."""
RATE_WINDOW = 30.0
"""Seconds of completions that progress rates and the ETA are computed over."""


# --- pure bookkeeping -------------------------------------------------------------------------
class RateMeter:
    """Rows and tokens per second over the last ``window`` seconds of completions."""

    def __init__(self, started: float, window: float = RATE_WINDOW) -> None:
        self.started, self.window = started, window
        self.samples: deque[tuple[float, int, int]] = deque()

    def add(self, now: float, rows: int, tokens: int) -> None:
        if rows:
            self.samples.append((now, rows, tokens))

    def rates(self, now: float) -> tuple[float, float]:
        while self.samples and self.samples[0][0] < now - self.window:
            self.samples.popleft()
        span = now - max(self.started, now - self.window)
        if span <= 0 or not self.samples:
            return 0.0, 0.0
        return sum(s[1] for s in self.samples) / span, sum(s[2] for s in self.samples) / span


class RowBook:
    """Which rows are pending, in flight, finished: one state byte per row, no I/O.

    ``outstanding`` holds the rows sent and not finished (the window), ``order`` the rows in the
    order they finished (for ``as_completed``).
    """

    def __init__(self, states: bytes | bytearray = b"", total: int | None = None) -> None:
        self.states = bytearray(states)
        self.total = total
        self.counts = [0, 0, 0, 0]
        self.sent = 0
        self.outstanding: set[int] = set()
        self.order = array.array("q")
        for index, state in enumerate(self.states):
            self.counts[state & 3] += 1
            self.sent += bool(state & SENT)
            if state & 3:
                self.order.append(index)
            elif state & SENT:
                self.outstanding.add(index)
        if total is not None:
            self.grow(total)

    def grow(self, size: int) -> None:
        if size > len(self.states):
            self.counts[PENDING] += size - len(self.states)
            self.states.extend(bytes(size - len(self.states)))

    def set_total(self, total: int) -> None:
        self.total = total
        self.grow(total)

    def untouched(self, index: int) -> bool:
        """Neither sent nor finished: a resubmission sends it."""
        return index >= len(self.states) or self.states[index] == PENDING

    def mark_sent(self, index: int) -> None:
        self.grow(index + 1)
        self.sent += not self.states[index] & SENT
        self.states[index] |= SENT
        if not self.states[index] & 3:
            self.outstanding.add(index)

    def finish(self, index: int, kind: int) -> bool:
        """Record a row's outcome; False if it was already recorded."""
        self.grow(index + 1)
        if self.states[index] & 3:
            return False
        self.states[index] = (self.states[index] & SENT) | kind
        self.counts[PENDING] -= 1
        self.counts[kind] += 1
        self.outstanding.discard(index)
        self.order.append(index)
        return True

    def reopen(self, index: int) -> None:
        """A finished row goes back to pending and unsent (``retry_failed``)."""
        kind = self.states[index] & 3
        if kind:
            self.counts[kind] -= 1
            self.counts[PENDING] += 1
        self.sent -= bool(self.states[index] & SENT)
        self.states[index] = PENDING

    def cancel_unsent(self, handed: int) -> list[int]:
        """Mark every row never sent as cancelled; a lazy source ends at ``handed`` rows."""
        if self.total is None:
            self.set_total(max(handed, len(self.states)))
        unsent = [i for i in self.indices(PENDING) if not self.states[i] & SENT]
        for index in unsent:
            self.finish(index, CANCELLED)
        return unsent

    def indices(self, kind: int) -> list[int]:
        return [i for i, state in enumerate(self.states) if state & 3 == kind]

    def ready_run(self, start: int, limit: int) -> int:
        """How many consecutive rows from ``start`` are finished (at most ``limit``)."""
        end = min(len(self.states), start + limit)
        count = 0
        while start + count < end and self.states[start + count] & 3:
            count += 1
        return count

    @property
    def finished(self) -> bool:
        return self.total is not None and self.counts[PENDING] == 0 and len(self.states) >= self.total


def book_from_bitmaps(total: int | None, sent: bytes, ok: bytes, failed: bytes, cancelled: bytes) -> RowBook:
    """A ``RowBook`` from the job's Redis bitmaps (bit ``i`` is row ``i``, most significant first)."""
    size = total if total is not None else 8 * max(len(sent), len(ok), len(failed), len(cancelled))
    value = 0
    for bitmap, flag in ((sent, SENT), (ok, OK), (failed, FAILED), (cancelled, CANCELLED)):
        value |= int.from_bytes(_expand(bitmap, size, flag), "big")
    states = value.to_bytes(size, "big")
    if total is None:  # trailing padding of the last bitmap byte is not rows
        states = states[: _last_marked(states) + 1]
    return RowBook(states, total)


_EXPAND = {flag: [bytes(flag if byte >> (7 - bit) & 1 else 0 for bit in range(8)) for byte in range(256)]
           for flag in (SENT, OK, FAILED, CANCELLED)}


def _expand(bitmap: bytes, size: int, flag: int) -> bytes:
    table = _EXPAND[flag]
    return b"".join(table[byte] for byte in bitmap)[:size].ljust(size, b"\0")


def _last_marked(states: bytes) -> int:
    return len(states.rstrip(b"\0")) - 1


def outcome(result: GenerationResult) -> int:
    if result.finish_reason == "cancelled":
        return CANCELLED
    return OK if result.ok else FAILED


# --- the public progress record -----------------------------------------------------------------
@dataclass(frozen=True)
class JobProgress:
    """Where a job stands. ``pending`` rows have no result yet (queued, running or unsent)."""

    job_id: str
    state: str
    """``running``, ``finished`` or ``cancelled``."""
    total: int | None
    done: int
    failed: int
    cancelled: int
    pending: int
    sent: int
    rows_per_second: float
    tokens_per_second: float
    eta_seconds: float | None

    @property
    def completed(self) -> int:
        return self.done + self.failed + self.cancelled

    def summary(self) -> str:
        total = "?" if self.total is None else str(self.total)
        eta = "" if self.eta_seconds is None else f", ETA {_duration(self.eta_seconds)}"
        return (f"job {self.job_id}: {self.state}, {self.completed}/{total} rows ({self.done} done, "
                f"{self.failed} failed, {self.cancelled} cancelled, {self.pending} pending), "
                f"{self.rows_per_second:.1f} rows/s, {self.tokens_per_second:.1f} tokens/s{eta}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class JobKeys:
    """Redis keys of one job (see the module docstring)."""

    def __init__(self, job_id: str) -> None:
        self.info = job_key(job_id)
        self.sent, self.ok, self.failed, self.cancelled, self.rows, self.sending, self.producer = (
            f"{self.info}:{name}" for name in ("sent", "ok", "failed", "cancelled", "rows", "sending", "producer"))

    def bitmaps(self) -> list[str]:
        """In the order ``book_from_bitmaps`` takes them."""
        return [self.sent, self.ok, self.failed, self.cancelled]

    def bitmap(self, kind: int) -> str:
        return {OK: self.ok, FAILED: self.failed, CANCELLED: self.cancelled}[kind]

    def all(self) -> list[str]:
        return [self.info, *self.bitmaps(), self.rows, self.sending]


def check_job_id(job_id: str) -> str:
    if not JOB_ID.match(job_id):
        raise RequestError.for_field("job_id", "must be 1 to 64 letters, digits, '_', '.' or '-', "
                                     f"starting with a letter or digit, got {job_id!r}")
    return job_id


# --- the job --------------------------------------------------------------------------------
class Job:
    """A bulk job: follow its progress, read results in input order, cancel or retry it.

    Made by ``FarmClient.submit_job`` (which sends rows from a background thread, at most
    ``window`` outstanding) or ``FarmClient.job`` (reattach from any process: follow, cancel, retry).
    """

    def __init__(self, client: FarmClient, job_id: str, window: int, limits: Limits,
                 params: dict[str, Any]) -> None:
        self.client, self.id, self.window = client, check_job_id(job_id), window
        self.keys = JobKeys(job_id)
        self.params, self.limits = params, limits
        self.book = RowBook()
        self._cond = threading.Condition(threading.RLock())
        self._cache: dict[int, GenerationResult] = {}
        self._meter = RateMeter(time.monotonic())
        self._source: Iterator[tuple[int, Any]] | None = None
        self._handed = 0
        self._retry: list[tuple[int, dict[str, Any] | FarmError]] = []
        self._unsettled: list[tuple[int, dict[str, Any] | FarmError]] = []
        self._cancelled = False
        self._lease: str | None = None
        self._pump: threading.Thread | None = None
        self._closing = threading.Event()
        self._error: BaseException | None = None
        self._sender_app: Celery | None = None
        self._refreshed = 0.0
        self._created = time.time()
        self._measuring = False

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    # --- making ---------------------------------------------------------------------------------
    @classmethod
    def submit(cls, client: FarmClient, prompts: Iterable[Any], job_id: str | None = None, *,
               total: int | None = None, window: int | None = None, fingerprint: str | None = None,
               **params: Any) -> Job:
        """Start (or resume) a job; returns once its rows are being sent in the background."""
        if window is not None and window < 1:
            raise RequestError.for_field("window", f"must be at least 1, got {window}")
        limits = client.limits()
        _check_params(params, limits)
        if total is None and isinstance(prompts, Sized):
            total = len(prompts)
        job = cls(client, job_id or uuid.uuid4().hex[:16], window or client.settings.job_window, limits, params)
        job._acquire_lease()
        try:
            job._load(create=(total, fingerprint))
            job._settle_sending()
        except BaseException:
            job._release_lease()
            raise
        job._source = enumerate(prompts)
        job._start()
        return job

    @classmethod
    def attach(cls, client: FarmClient, job_id: str) -> Job:
        """Follow a job submitted elsewhere (another process, or before a restart)."""
        job = cls(client, job_id, client.settings.job_window, client.limits(), {})
        job._load(create=None)
        return job

    # --- following ------------------------------------------------------------------------------
    @property
    def total(self) -> int | None:
        return self.book.total

    def progress(self) -> JobProgress:
        """Rows done / failed / cancelled / pending, rates over the last 30 s, and the ETA."""
        if not self._pumping():
            self._sync()
        with self._cond:
            return self._progress()

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
        self._ensure_pump()
        with self._cond:
            while not self.book.finished:
                self._wait_step(deadline)
            return self._progress()

    # --- acting ---------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the job: unsent rows are never sent, queued rows are revoked, running rows stop at
        their next token; all of them report ``finish_reason == "cancelled"``."""
        if self.book.finished:
            return
        with self.client._reachable():
            pipe = self.client.redis.pipeline(transaction=False)
            pipe.hset(self.keys.info, "state", "cancelled")
            for key in self.keys.bitmaps():
                pipe.get(key)
            _, *bitmaps = pipe.execute()
        remote = book_from_bitmaps(self.total, *(b or b"" for b in bitmaps))
        with self._cond:
            in_flight = remote.outstanding | self.book.outstanding
        self._stop_rows(sorted(in_flight))
        self._on_cancelled()

    def retry_failed(self) -> int:
        """Send the failed rows again (not cancelled or invalid ones); returns how many."""
        if self._cancelled:
            raise RequestError.for_field("job_id", f"job {self.id} was cancelled; submit a new job")
        if not self._pumping():
            self._sync()
        with self._cond:
            failed = self.book.indices(FAILED)
        retry = self._stored_requests(failed)
        if not retry:
            return 0
        if self._lease is None:
            self._acquire_lease()
        self._reset_rows([i for i, _ in retry])
        with self._cond:
            for index, _ in retry:
                self.book.reopen(index)
                self._cache.pop(index, None)
            self._retry.extend(retry)
        self._start()
        return len(retry)

    def close(self) -> None:
        """Stop sending and following (rows already sent still run); releases the lease."""
        self._closing.set()
        if self._pump is not None and self._pump is not threading.current_thread():
            self._pump.join(10)
        self._release_lease()

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
        info, bitmaps = self._read_state()
        if not info and create is None:
            raise RequestError.for_field("job_id", f"no job {self.id!r} in Redis at "
                                         f"{self.client.settings.redacted_redis_url()} (never submitted, or expired)")
        if not info and create is not None:
            info = self._create(*create)
        elif create is not None:
            self._check_same(info, *create)
        total = int(info["total"])
        self.params = json.loads(info["params"])
        self._created = float(info.get("created") or time.time())
        self._cancelled = info.get("state") == "cancelled"
        with self._cond:
            self.book = book_from_bitmaps(total if total >= 0 else None, *bitmaps)
            self._handed = len(self.book.states)
            if self._cancelled:
                self.book.cancel_unsent(self._handed)

    def _read_state(self) -> tuple[dict[str, str], list[bytes]]:
        with self.client._reachable():
            pipe = self.client.redis.pipeline(transaction=False)
            pipe.hgetall(self.keys.info)
            for key in self.keys.bitmaps():
                pipe.get(key)
            raw_info, *bitmaps = pipe.execute()
        return {_text(k): _text(v) for k, v in raw_info.items()}, [b or b"" for b in bitmaps]

    def _create(self, total: int | None, fingerprint: str | None) -> dict[str, str]:
        info = {"total": str(-1 if total is None else total), "params": json.dumps(self.params, sort_keys=True),
                "created": str(time.time()), "state": "running", "fingerprint": fingerprint or ""}
        with self.client._reachable():
            pipe = self.client.redis.pipeline(transaction=False)
            pipe.hset(self.keys.info, mapping=info)  # type: ignore[arg-type]
            pipe.expire(self.keys.info, self.client.settings.result_expires)
            pipe.execute()
        return info

    def _check_same(self, info: dict[str, str], total: int | None, fingerprint: str | None) -> None:
        """A resubmission must be the same job: same parameters, rows and prompts."""
        if json.loads(info["params"]) != json.loads(json.dumps(self.params)):
            raise RequestError.for_field("job_id", f"job {self.id} exists with other parameters "
                                         f"({info['params']}); use another job id")
        stored = int(info["total"])
        if total is not None and stored >= 0 and stored != total:
            raise RequestError.for_field("job_id", f"job {self.id} has {stored} rows, not {total}; use another job id")
        if fingerprint and info.get("fingerprint") and info["fingerprint"] != fingerprint:
            raise RequestError.for_field("job_id", f"job {self.id} was submitted with other prompts; "
                                         "use another job id")

    def _settle_sending(self) -> None:
        """Rows a killed producer was enqueueing: sent if a trace of their message exists
        (result, stream, queued or reserved message), else they are sent again."""
        with self.client._reachable():
            rows = sorted(int(i) for i in self.client.redis.smembers(self.keys.sending))
            if not rows:
                return
            ids = [self._task_id(i) for i in rows]
            pipe = self.client.redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.exists(self._meta_key(task_id), stream_key(task_id))
            traces = pipe.execute()
            queued = self._ids_in_broker()
            sent = [i for i, task_id, n in zip(rows, ids, traces, strict=True) if n or task_id in queued]
            pipe = self.client.redis.pipeline(transaction=False)
            for index in sent:
                pipe.setbit(self.keys.sent, index, 1)
            pipe.delete(self.keys.sending)
            pipe.execute()
        with self._cond:
            for index in sent:
                self.book.mark_sent(index)

    def _ids_in_broker(self) -> set[str]:
        """Task ids of this job's messages waiting in the bulk queue or reserved by a worker."""
        prefix = f"{self.id}:".encode()
        queued = [json.loads(r) for r in self.client.redis.lrange(BULK_QUEUE, 0, -1) if prefix in r]
        # kombu keeps a reserved message as json ``[message, exchange, routing_key]``
        queued += [json.loads(r)[0] for r in self.client.redis.hvals("unacked") if prefix in r]
        return {str(message["headers"]["id"]) for message in queued}

    # --- the background pump --------------------------------------------------------------------
    def _start(self) -> None:
        with self._cond:
            if self._pumping():
                return
            self._closing.clear()
            self._pump = threading.Thread(target=self._run_pump, name=f"job-{self.id}", daemon=True)
            self._pump.start()

    def _ensure_pump(self) -> None:
        if not self._pumping() and not self.book.finished:
            self._start()

    def _pumping(self) -> bool:
        return self._pump is not None and self._pump.is_alive()

    def _run_pump(self) -> None:
        outage: float | None = None
        try:
            while not self._closing.is_set():
                try:
                    if self._pump_step():
                        break
                    outage = None
                except FarmUnavailable:  # ride out a short Redis outage (a restart, a failover)
                    outage = outage or time.monotonic()
                    if time.monotonic() - outage > OUTAGE_SECONDS:
                        raise
                    self._closing.wait(1.0)
            self._mark_finished()
        except BaseException as error:  # noqa: BLE001 - handed to the threads that follow the job
            self._error = error
        finally:
            self._release_lease()
            with self._cond:
                self._cond.notify_all()

    def _pump_step(self) -> bool:
        """Send what the window allows, record what finished; True once every row is finished."""
        if self._unsettled:
            self._resettle()
        sent = self._fill_window()
        changed = self._observe()
        with self._cond:
            if self.book.finished and not self._retry:
                return True
        if not (sent or changed):
            self._closing.wait(POLL_SECONDS)
        return False

    def _resettle(self) -> None:
        """After a failure in the middle of a chunk: rows whose message did not make it go again."""
        self._settle_sending()
        with self._cond:
            again = [(i, r) for i, r in self._unsettled if self.book.untouched(i)]
            self._retry[:0] = again
            self._unsettled = []

    def _fill_window(self) -> int:
        """Send rows while fewer than ``window`` are outstanding; returns how many were sent."""
        sent = 0
        while not self._cancelled and self._lease is not None:
            with self._cond:
                room = min(CHUNK, self.window - len(self.book.outstanding))
            chunk = self._next_rows(room) if room > 0 else []
            if not chunk:
                return sent
            self._send_chunk(chunk)
            sent += len(chunk)
        return sent

    def _next_rows(self, count: int) -> list[tuple[int, dict[str, Any] | FarmError]]:
        with self._cond:
            chunk: list[tuple[int, dict[str, Any] | FarmError]] = list(self._retry[:count])
            del self._retry[:count]
        while len(chunk) < count and self._source is not None:
            try:
                index, row = next(self._source)
            except StopIteration:
                self._source_ended()
                break
            self._handed = index + 1
            if self.book.untouched(index):
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
        with self._cond:
            if self.book.total is not None and self.book.total != self._handed:
                raise RequestError.for_field("prompts", f"job {self.id} has {self.book.total} rows, "
                                             f"but the prompts given have {self._handed}")
            if self.book.total is None:
                self.book.set_total(self._handed)
        with self.client._reachable():
            self.client.redis.hset(self.keys.info, "total", str(self._handed))

    def _send_chunk(self, chunk: list[tuple[int, dict[str, Any] | FarmError]]) -> None:
        """Enqueue rows, recording them in ``sending`` first and in ``sent`` after."""
        now = time.time()
        self._unsettled = chunk  # until recorded as sent; see _resettle
        with self.client._reachable():
            self._before_send(chunk, now)
            for index, request in chunk:
                self._send_row(index, request, now)
            pipe = self.client.redis.pipeline(transaction=False)
            for index, _ in chunk:
                pipe.setbit(self.keys.sent, index, 1)
            pipe.srem(self.keys.sending, *(i for i, _ in chunk))
            pipe.hget(self.keys.info, "state")
            state = pipe.execute()[-1]
        self._unsettled = []
        with self._cond:
            for index, _ in chunk:
                self.book.mark_sent(index)
        if _text(state or b"") == "cancelled":  # cancelled elsewhere while this chunk was sent
            self._stop_rows([i for i, _ in chunk])
            self._on_cancelled()

    def _before_send(self, chunk: list[tuple[int, dict[str, Any] | FarmError]], now: float) -> None:
        ttl = self.client.settings.result_expires
        pipe = self.client.redis.pipeline(transaction=False)
        pipe.sadd(self.keys.sending, *(i for i, _ in chunk))
        for index, request in chunk:
            if isinstance(request, dict):
                meta = {"submitted_at": now, "job": self.id, "index": index}
                pipe.set(submitted_key(self._task_id(index)), json.dumps(meta), ex=ttl)
                pipe.hset(self.keys.rows, str(index), json.dumps(request))
        for key in self.keys.all():
            pipe.expire(key, ttl)
        pipe.execute()

    def _send_row(self, index: int, request: dict[str, Any] | FarmError, now: float) -> None:
        task_id = self._task_id(index)
        if isinstance(request, FarmError):  # an invalid row fails alone, recorded like a worker failure
            self.client.app.backend.store_result(task_id, request, "FAILURE")
            return
        meta = {"submitted_at": now, "job": self.id, "index": index}
        self._sender().send_task(GENERATE_TASK, kwargs={"request": request, "meta": meta}, task_id=task_id,
                                 queue=BULK_QUEUE, routing_key=BULK_QUEUE)

    def _sender(self) -> Celery:
        """An app without a result backend: Celery's Redis backend would otherwise subscribe
        to (and unsubscribe from) every row's result channel, two needless commands per row."""
        if self._sender_app is None:
            app = make_celery(self.client.settings, name="batchfarm-bulk")
            app.conf.result_backend = "disabled"
            self._sender_app = app
        return self._sender_app

    def _observe(self) -> bool:
        """Read the results of outstanding rows (one MGET per ``FETCH`` rows) and record them."""
        with self._cond:
            rows = sorted(self.book.outstanding)
        if self._lease is None and time.monotonic() - self._refreshed > REFRESH_SECONDS:
            rows = self._refresh_sent()
        finished = self._read_results(rows)
        state = self._record(finished)
        if state == "cancelled" and not self._cancelled:
            self._stop_rows(rows)
            self._on_cancelled()
        with self._cond:
            for index, result in finished:
                self.book.finish(index, outcome(result))
                self._remember(index, result)
            if self._measuring:  # a first look finds rows that finished unwatched: not a rate
                self._meter.add(time.monotonic(), len(finished), sum(r.completion_tokens for _, r in finished))
            self._measuring = True
            if finished:
                self._cond.notify_all()
        return bool(finished)

    def _refresh_sent(self) -> list[int]:
        """Rows another process sent since this one last looked (a job followed, not sent here)."""
        self._refreshed = time.monotonic()
        info, bitmaps = self._read_state()
        if not info:
            return sorted(self.book.outstanding)
        remote = book_from_bitmaps(None, *bitmaps)
        total = int(info["total"])
        with self._cond:
            if total >= 0 and self.book.total is None:
                self.book.set_total(total)
            for index in remote.outstanding:
                self.book.mark_sent(index)
            return sorted(self.book.outstanding)

    def _read_results(self, rows: list[int]) -> list[tuple[int, GenerationResult]]:
        finished = []
        for start in range(0, len(rows), FETCH):
            part = rows[start:start + FETCH]
            with self.client._reachable():
                raws = self.client.redis.mget([self._meta_key(self._task_id(i)) for i in part])
            for index, raw in zip(part, raws, strict=True):
                result = self._decode(index, raw)
                if result is not None:
                    finished.append((index, result))
        return finished

    def _record(self, finished: list[tuple[int, GenerationResult]]) -> str:
        """Write outcomes to the job's bitmaps and keep the lease; returns the job's state
        (another process may have cancelled it)."""
        with self.client._reachable():
            pipe = self.client.redis.pipeline(transaction=False)
            pipe.hget(self.keys.info, "state")
            pipe.get(self.keys.producer)
            pipe.expire(self.keys.producer, LEASE_SECONDS)
            for index, result in finished:
                kind = outcome(result)
                pipe.setbit(self.keys.bitmap(kind), index, 1)
                if kind != FAILED:
                    pipe.hdel(self.keys.rows, str(index))
            state, holder, *_ = pipe.execute()
        if self._lease is not None:
            self._keep_lease(_text(holder or b""))
        return _text(state or b"")

    def _keep_lease(self, holder: str) -> None:
        if holder == self._lease:
            return
        # Expired while this process stood still (a laptop asleep): take it back if still free.
        if holder or not self.client.redis.set(self.keys.producer, self._lease or "", nx=True, ex=LEASE_SECONDS):
            self._lease = None
            raise RequestError.for_field("job_id", f"job {self.id}: another producer took over this job")

    def _mark_finished(self) -> None:
        with self._cond:
            done = self.book.finished and not self._cancelled
        if done:
            with self.client._reachable():
                self.client.redis.hset(self.keys.info, "state", "finished")

    def _stop_rows(self, rows: list[int]) -> None:
        """Cancel flags (read by the worker at batch formation and at every token) and a revoke
        (a queued message is then dropped unrun)."""
        ids = [self._task_id(i) for i in rows]
        ttl = self.client.settings.result_expires
        for start in range(0, len(ids), 1000):
            part = ids[start:start + 1000]
            with self.client._reachable():
                pipe = self.client.redis.pipeline(transaction=False)
                for task_id in part:
                    pipe.set(cancel_key(task_id), "1", ex=ttl)
                pipe.execute()
                self.client.app.control.revoke(part)

    def _on_cancelled(self) -> None:
        with self._cond:
            self._cancelled = True
            self._source = None
            self._retry.clear()
            self.book.cancel_unsent(self._handed)
            self._cond.notify_all()
        with self.client._reachable():
            self.client.redis.hset(self.keys.info, "total", str(self.book.total))

    # --- retry ----------------------------------------------------------------------------------
    def _stored_requests(self, rows: list[int]) -> list[tuple[int, dict[str, Any]]]:
        if not rows:
            return []
        with self.client._reachable():
            raws = self.client.redis.hmget(self.keys.rows, [str(i) for i in rows])
        return [(i, json.loads(raw)) for i, raw in zip(rows, raws, strict=True) if raw]

    def _reset_rows(self, rows: list[int]) -> None:
        """Forget the failures so that the rows read as unsent and the worker runs them again."""
        with self.client._reachable():
            pipe = self.client.redis.pipeline(transaction=False)
            for index in rows:
                task_id = self._task_id(index)
                pipe.delete(self._meta_key(task_id), stream_key(task_id))
                pipe.setbit(self.keys.failed, index, 0)
                pipe.setbit(self.keys.sent, index, 0)
            pipe.hset(self.keys.info, "state", "running")
            pipe.execute()

    # --- waiting and reading --------------------------------------------------------------------
    def _wait_step(self, deadline: float | None) -> None:
        """One bounded wait on the condition (lock held); raises the pump's error or a timeout."""
        if self._error is not None:
            raise self._error
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"job {self.id} not finished after the timeout ({self._progress().summary()})")
        if not self._pumping():
            self._start()
        self._cond.wait(0.5 if remaining is None else min(0.5, remaining))

    def _wait_run(self, index: int, deadline: float | None) -> int:
        """Rows from ``index`` that are finished, waiting until there is at least one (0: the end)."""
        self._ensure_pump()
        with self._cond:
            while True:
                if self.book.total is not None and index >= self.book.total:
                    return 0
                count = self.book.ready_run(index, FETCH)
                if count:
                    return count
                self._wait_step(deadline)

    def _wait_order(self, position: int, deadline: float | None) -> list[int]:
        self._ensure_pump()
        with self._cond:
            while True:
                if position < len(self.book.order):
                    return list(self.book.order[position:position + FETCH])
                if self.book.finished and not self._retry:
                    return []
                self._wait_step(deadline)

    def _fetch(self, rows: list[int]) -> list[GenerationResult]:
        """Results of finished rows: from the cache, else from Redis."""
        with self._cond:
            found = {i: self._cache[i] for i in rows if i in self._cache}
        missing = [i for i in rows if i not in found]
        for start in range(0, len(missing), FETCH):
            part = missing[start:start + FETCH]
            with self.client._reachable():
                raws = self.client.redis.mget([self._meta_key(self._task_id(i)) for i in part])
            for index, raw in zip(part, raws, strict=True):
                found[index] = self._decode(index, raw) or self._absent(index)
        return [found[i] for i in rows]

    def _absent(self, index: int) -> GenerationResult:
        """A finished row without a stored result: cancelled before it was sent, or expired."""
        task_id = self._task_id(index)
        if self.book.states[index] & 3 == CANCELLED:
            return GenerationResult(id=task_id, finish_reason="cancelled")
        return GenerationResult.failed(task_id, FarmError(ErrorCode.INTERNAL, (
            f"the result of {task_id} is no longer in Redis (results expire after "
            f"{self.client.settings.result_expires}s)")))

    def _remember(self, index: int, result: GenerationResult) -> None:
        self._cache[index] = result
        while len(self._cache) > 4 * self.window:  # the rest are read back from Redis when needed
            del self._cache[next(iter(self._cache))]

    def _decode(self, index: int, raw: bytes | str | None) -> GenerationResult | None:
        if raw is None:
            return None
        meta = self.client.app.backend.decode_result(raw)
        if meta.get("status") not in READY_STATES:
            return None
        return result_from_meta(self._task_id(index), meta)

    def _sync(self) -> None:
        """One look at Redis for a job nobody follows in this process."""
        self._refreshed = 0.0
        self._observe()

    def _progress(self) -> JobProgress:
        book = self.book
        rows_rate, tokens_rate = self._meter.rates(time.monotonic())
        if not self._meter.samples and not book.finished and not self._cancelled:
            # Followed from another process and never watched over time: the average so far.
            rows_rate = (book.sent - len(book.outstanding)) / max(time.time() - self._created, 1e-3)
        pending = book.counts[PENDING]
        eta = pending / rows_rate if rows_rate > 0 and book.total is not None else None
        state = "cancelled" if self._cancelled else "finished" if book.finished else "running"
        return JobProgress(self.id, state, book.total, book.counts[OK], book.counts[FAILED],
                           book.counts[CANCELLED], pending, book.sent, rows_rate, tokens_rate, eta)

    # --- the lease ------------------------------------------------------------------------------
    def _acquire_lease(self) -> None:
        """One process sends a job's rows at a time. A holder on this host is checked by pid: a
        dead one is replaced at once, a live one is refused at once; a holder elsewhere is waited
        for until its lease expires (it is refreshed while it lives)."""
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + LEASE_SECONDS + 1
        with self.client._reachable():
            while not self.client.redis.set(self.keys.producer, token, nx=True, ex=LEASE_SECONDS):
                holder = _text(self.client.redis.get(self.keys.producer) or b"")
                alive = _holder_alive(holder)
                if alive is False:
                    self.client.redis.delete(self.keys.producer)
                    continue
                if alive or time.monotonic() > deadline:
                    raise RequestError.for_field("job_id", f"job {self.id} is being submitted by another "
                                                 f"producer ({holder}); wait for it, or cancel the job")
                time.sleep(0.2)
        self._lease = token

    def _release_lease(self) -> None:
        token, self._lease = self._lease, None
        if token is None:
            return
        try:
            if _text(self.client.redis.get(self.keys.producer) or b"") == token:
                self.client.redis.delete(self.keys.producer)
        except Exception:  # noqa: BLE001 - Redis gone: the lease expires by itself
            pass

    # --- names ----------------------------------------------------------------------------------
    def _task_id(self, index: int) -> str:
        return f"{self.id}:{index}"

    def _meta_key(self, task_id: str) -> str:
        return _text(self.client.app.backend.get_key_for_task(task_id))


def _check_params(params: dict[str, Any], limits: Limits) -> None:
    """Job-wide parameters are checked once, before anything is created or sent."""
    for name in ("prompt", "messages"):
        if name in params:
            raise RequestError.for_field(name, "give prompts as the rows of the job, not as a job parameter")
    GenerationRequest.from_dict({**params, "prompt": "x"}, limits)


def _holder_alive(holder: str) -> bool | None:
    """Whether a lease holder (``host:pid:nonce``) lives; None when this process cannot tell
    (another host, or this very process, whose finishing job releases it in a moment)."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
