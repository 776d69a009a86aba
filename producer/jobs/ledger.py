"""A job's rows as this process knows them, shared by the thread that sends and observes them
and the threads that read results: the row book, recent results, rates, and the condition they
wait on. No I/O."""

from __future__ import annotations

import threading
import time

from protocol.schema import GenerationResult

from producer.jobs.book import CANCELLED, FAILED, OK, PENDING, JobProgress, RateMeter, RowBook, outcome


class Ledger:
    """``book`` and ``cancelled`` are read and changed under ``cond`` (a re-entrant lock); a
    change that readers wait for is announced with ``cond.notify_all()``."""

    def __init__(self, job_id: str, window: int) -> None:
        self.job_id = job_id
        self.book = RowBook()
        self.cond = threading.Condition(threading.RLock())
        self.cancelled = False
        self.error: BaseException | None = None
        """What stopped the pump thread, raised in the threads that follow the job."""
        self.created = time.time()
        self._cache: dict[int, GenerationResult] = {}
        self._cache_size = 4 * window
        self._meter = RateMeter(time.monotonic())
        self._measuring = False

    def reload(self, book: RowBook, created: float, cancelled: bool) -> None:
        """The state read from Redis replaces what this process knew."""
        with self.cond:
            self.book, self.created, self.cancelled = book, created, cancelled

    def record(self, finished: list[tuple[int, GenerationResult]]) -> None:
        """Rows that finished, seen by one look at their results."""
        with self.cond:
            for index, result in finished:
                self.book.finish(index, outcome(result))
                self._remember(index, result)
            if self._measuring:  # a first look finds rows that finished unwatched: not a rate
                tokens = sum(r.completion_tokens for _, r in finished)
                self._meter.add(time.monotonic(), len(finished), tokens)
            self._measuring = True
            if finished:
                self.cond.notify_all()

    def cached(self, rows: list[int]) -> dict[int, GenerationResult]:
        with self.cond:
            return {i: self._cache[i] for i in rows if i in self._cache}

    def reopen(self, rows: list[int]) -> None:
        """Failed rows go back to pending (``retry_failed``)."""
        with self.cond:
            for index in rows:
                self.book.reopen(index)
                self._cache.pop(index, None)

    def progress(self) -> JobProgress:
        with self.cond:
            book = self.book
            rows_rate, tokens_rate = self._meter.rates(time.monotonic())
            if not self._meter.samples and not book.finished and not self.cancelled:
                # Followed from another process and never watched over time: the average so far.
                rows_rate = (book.sent - len(book.outstanding)) / max(time.time() - self.created, 1e-3)
            pending = book.counts[PENDING]
            eta = pending / rows_rate if rows_rate > 0 and book.total is not None else None
            state = "cancelled" if self.cancelled else "finished" if book.finished else "running"
            return JobProgress(self.job_id, state, book.total, book.counts[OK], book.counts[FAILED],
                               book.counts[CANCELLED], pending, book.sent, rows_rate, tokens_rate, eta)

    def _remember(self, index: int, result: GenerationResult) -> None:
        self._cache[index] = result
        while len(self._cache) > self._cache_size:  # the rest are read back from Redis when needed
            del self._cache[next(iter(self._cache))]
