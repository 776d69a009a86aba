"""A job's bookkeeping with no I/O: row states, their order, progress, rates.

Everything here is pure (no Redis, no threads), so that ``tests/test_producer_jobs_unit.py``
covers it on its own.
"""

from __future__ import annotations

import array
import re
from collections import deque
from dataclasses import dataclass

from protocol.errors import RequestError
from protocol.schema import GenerationResult

PENDING, OK, FAILED, CANCELLED = 0, 1, 2, 3
"""A row's outcome, in the low two bits of its state byte."""
SENT = 4
"""Flag bit: the row's message was enqueued (or its failure stored)."""
KINDS = {OK: "ok", FAILED: "failed", CANCELLED: "cancelled"}
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
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
        """A row goes back to pending and unsent (``retry_failed``, a row lost in flight)."""
        kind = self.states[index] & 3
        if kind:
            self.counts[kind] -= 1
            self.counts[PENDING] += 1
        self.sent -= bool(self.states[index] & SENT)
        self.states[index] = PENDING
        self.outstanding.discard(index)

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
        eta = "" if self.eta_seconds is None else f", ETA {format_duration(self.eta_seconds)}"
        return (f"job {self.job_id}: {self.state}, {self.completed}/{total} rows ({self.done} done, "
                f"{self.failed} failed, {self.cancelled} cancelled, {self.pending} pending), "
                f"{self.rows_per_second:.1f} rows/s, {self.tokens_per_second:.1f} tokens/s{eta}")


def format_duration(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on (an ETA, a time taken)."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def check_job_id(job_id: str) -> str:
    if not JOB_ID.match(job_id):
        raise RequestError.for_field("job_id", "must be 1 to 64 letters, digits, '_', '.' or '-', "
                                     f"starting with a letter or digit, got {job_id!r}")
    return job_id
