"""Counters the heartbeat and metrics report, and the busy-time meter that feeds them."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

SEGMENT_SECONDS = 1.0
"""Stats are recorded per busy segment of at most this long (a continuous batch never ends)."""


@dataclass
class BatchRecord:
    at: float
    size: int
    tokens: int
    seconds: float


@dataclass
class EngineStats:
    """Counters the heartbeat and metrics report."""

    batches: int = 0
    requests: int = 0
    failed: int = 0
    tokens: int = 0
    oom_splits: int = 0
    recent: deque[BatchRecord] = field(default_factory=lambda: deque(maxlen=256))

    def record(self, size: int, tokens: int, seconds: float) -> None:
        self.batches += 1
        self.requests += size
        self.tokens += tokens
        self.recent.append(BatchRecord(time.time(), size, tokens, seconds))


@dataclass
class _Segment:
    start: float
    requests: int = 0
    tokens: int = 0


class BusyMeter:
    """Records busy time and what finished in it: one record per run-to-end batch, or per
    ``SEGMENT_SECONDS`` of a running batch. Idle time between busy periods is not counted."""

    def __init__(self, stats: EngineStats) -> None:
        self.stats = stats
        self._segment: _Segment | None = None

    def busy(self, now: float) -> None:
        """A step starts (opens a segment if none is open)."""
        if self._segment is None:
            self._segment = _Segment(now)

    def finished(self, tokens: int) -> None:
        if self._segment is not None:
            self._segment.requests += 1
            self._segment.tokens += tokens

    def settle(self, now: float, idle: bool) -> None:
        """After a step: record the segment when the engine went idle or the segment is long enough."""
        segment = self._segment
        if segment is None:
            return
        if segment.requests and (idle or now - segment.start >= SEGMENT_SECONDS):
            self.stats.record(segment.requests, segment.tokens, now - segment.start)
            self._segment = None if idle else _Segment(now)
        elif idle:
            self._segment = None
