"""The engine's three outward roles, one Protocol each: where partial text goes, where cancel
flags come from, and the execution counters that tests read. Redis implements all three in
``worker/streams.py``; tests use fakes (tests/engine_fakes.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from protocol.schema import GenerationResult


class StreamOutput(Protocol):
    """Streamed output of requests: a start, text deltas, an end carrying the result."""

    def begin(self, request_ids: list[str], worker: str, batch_size: int) -> None: ...
    def write(self, deltas: dict[str, str], finished: list[str]) -> None: ...
    def end(self, result: GenerationResult) -> None: ...


class CancelFlags(Protocol):
    """Which of these requests a client has cancelled."""

    def cancelled(self, request_ids: list[str]) -> set[str]: ...


class ExecutionCounter(Protocol):
    """How often each request ran, and which came back redelivered (read by reliability tests)."""

    def count_execution(self, request_ids: list[str]) -> None: ...
    def note_redelivery(self, request_id: str) -> None: ...


class NoCounter:
    """Counts nothing (production default)."""

    def count_execution(self, request_ids: list[str]) -> None:
        pass

    def note_redelivery(self, request_id: str) -> None:
        pass


@dataclass(frozen=True)
class EngineSinks:
    output: StreamOutput
    cancels: CancelFlags
    counter: ExecutionCounter = field(default_factory=NoCounter)
    cancel_poll_seconds: float = 0.05
    """While rows run, cancel flags are read at most this often (a cancel stops a row within it)."""

    def with_output(self, output: StreamOutput) -> EngineSinks:
        """The same sinks with ``output`` in place of the stream (e.g. wrapped for metrics)."""
        return replace(self, output=output)


class StepRelay:
    """The runners' ``StepObserver``: deltas go to the output; cancels are read from the flags,
    at most every ``poll_seconds``, for the rows of the step."""

    def __init__(self, sinks: EngineSinks, clock: Callable[[], float] = time.monotonic) -> None:
        self.output, self.cancels, self.poll_seconds = sinks.output, sinks.cancels, sinks.cancel_poll_seconds
        self.clock = clock
        self._polled = float("-inf")
        self._cancelled: set[str] = set()

    def on_step(self, deltas: dict[str, str], finished: list[str]) -> set[str]:
        self.output.write(deltas, finished)
        now = self.clock()
        if deltas and now - self._polled >= self.poll_seconds:
            self._polled = now
            self._cancelled = self.cancels.cancelled(list(deltas))
        return self._cancelled
