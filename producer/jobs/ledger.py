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
        self.tokens = 0
        """Completion tokens of the job's finished rows, as Redis counts them (all processes')."""
        self.last_result: float | None = None
        """When the job's last row finished (epoch seconds), None before the first."""

    def reload(self, book: RowBook, created: float, cancelled: bool, tokens: int = 0,
               last_result: float | None = None) -> None:
        """The state read from Redis replaces what this process knew."""
        with self.cond:
            self.book, self.created, self.cancelled = book, created, cancelled
            self.counted(tokens, last_result)

    def counted(self, tokens: int, last_result: float | None) -> None:
        """The job's token count and last result time, as Redis has them after a look."""
        with self.cond:
            self.tokens, self.last_result = tokens, last_result

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
            state = "cancelled" if self.cancelled else "finished" if book.finished else "running"
            rows_rate, tokens_rate = self._meter.rates(time.monotonic())
            if state != "running" or not self._meter.samples:
                # Over, or followed from another process and not watched over time: the mean rate.
                rows_rate, tokens_rate = self.mean_rates()
            pending = book.counts[PENDING]
            eta = pending / rows_rate if rows_rate > 0 and book.total is not None else None
            return JobProgress(self.job_id, state, book.total, book.counts[OK], book.counts[FAILED],
                               book.counts[CANCELLED], pending, book.sent, rows_rate, tokens_rate, eta)

    def mean_rates(self) -> tuple[float, float]:
        """Rows and tokens per second from the job's creation to its last result: its busy time,
        not the time since (a finished job keeps its rate)."""
        with self.cond:
            span = (self.last_result or 0.0) - self.created
            rows = self.book.counts[OK] + self.book.counts[FAILED]
            return (rows / span, self.tokens / span) if span > 0 and self.last_result else (0.0, 0.0)

    def _remember(self, index: int, result: GenerationResult) -> None:
        self._cache[index] = result
        while len(self._cache) > self._cache_size:  # the rest are read back from Redis when needed
            del self._cache[next(iter(self._cache))]
