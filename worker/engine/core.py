"""The engine core: one request's life on the model thread, whatever the batching strategy.

``admit`` templates and tokenizes a submission (or fails it with a clear error); ``step`` asks
the strategy what to start, starts it (skipping what clients cancelled), advances the running
rows, and updates from the step's output: each row that left done is finished with its result.
A failed step is recovered here for both strategies: its rows are retried to the end in halves
after out of memory, else one by one, so that no request fails for its neighbours.

Single-threaded and free of torch: ``model_thread.Engine`` runs it on the model thread, and tests
drive it directly with a fake runner and fake sinks (tests/test_engine_core.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from protocol.errors import ErrorCode, FarmError, GenerationError, RequestError
from protocol.schema import GenerationRequest, GenerationResult
from worker.engine.runner import BatchRow, Runner, StepObserver
from worker.engine.scheduler import DynamicScheduler, Pending, batch_cost, split_for_retry
from worker.engine.sinks import EngineSinks, StepRelay
from worker.engine.stats import BusyMeter, EngineStats
from worker.engine.strategies import StepOutput, Strategy, run_to_end

log = logging.getLogger(__name__)


class RenderFn(Protocol):
    def __call__(self, request: GenerationRequest) -> str: ...


@dataclass
class Submission:
    request_id: str
    request: GenerationRequest
    submitted_at: float
    """Client's wall-clock time of enqueueing (for queue_seconds)."""
    priority: int
    future: Future[GenerationResult] = field(default_factory=Future)


@dataclass
class _Admitted:
    """A request from admission to its result."""

    sub: Submission
    row: BatchRow
    pending: Pending
    started: float | None = None
    """When its current run began (monotonic); ``None`` while it waits."""
    peak: int = 0
    """The largest batch it has been in during that run."""


Step = Callable[[StepObserver], StepOutput]


class EngineCore:
    """Admits, plans, runs, finishes and recovers requests; the strategy decides who runs together."""

    def __init__(self, runner: Runner, strategy: Strategy, sinks: EngineSinks, worker_name: str,
                 render: RenderFn, max_prompt_tokens: int) -> None:
        self.runner, self.strategy, self.sinks = runner, strategy, sinks
        self.worker_name, self.render, self.max_prompt_tokens = worker_name, render, max_prompt_tokens
        self.stats = EngineStats()
        self.running = 0
        self._meter = BusyMeter(self.stats)
        self._observer = StepRelay(sinks)
        self._requests: dict[str, _Admitted] = {}

    @property
    def scheduler(self) -> DynamicScheduler:
        return self.strategy.scheduler

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    def wait_time(self, now: float) -> float | None:
        """How long the caller may wait for new submissions: not at all while rows run."""
        return 0.0 if self.strategy.running else self.scheduler.wait_time(now)

    # ------------------------------------------------------------------ admit

    def admit(self, subs: list[Submission]) -> None:
        for sub in subs:
            try:
                row = self._prepare(sub)
            except FarmError as error:
                self._fail(sub, error)
                continue
            group = "" if self.runner.mixes_adapters else row.adapter  # mixed-adapter batches
            pending = Pending(sub.request_id, len(row.input_ids), sub.request.max_new_tokens,
                              time.monotonic(), sub.priority, group)
            self._requests[sub.request_id] = _Admitted(sub, row, pending)
            self.scheduler.add(pending)

    def _prepare(self, sub: Submission) -> BatchRow:
        """Template and tokenize in the model thread (fast tokenizers are not thread-safe)."""
        ids = self.runner.encode(self.render(sub.request))
        if len(ids) > self.max_prompt_tokens:
            raise RequestError.for_field(
                "prompt", f"is {len(ids)} tokens, over the limit of {self.max_prompt_tokens}",
                ErrorCode.PROMPT_TOO_LONG)
        return self.runner.new_row(sub.request_id, ids, sub.request)

    # ------------------------------------------------------------------ plan and run

    def step(self) -> None:
        """Start what the strategy plans, then advance the rows that remain running."""
        running = [a.pending for a in self._requests.values() if a.started is not None]
        planned = self.strategy.plan(time.monotonic(), running)
        if planned:
            self._start([self._requests[p.request_id] for p in planned])
        if self.strategy.running:
            self._run(self.strategy.advance, self.strategy.drop)

    def _start(self, planned: list[_Admitted]) -> None:
        live = self._skip_cancelled(planned)
        if live:
            rows = [a.row for a in live]
            self._begin(live, self.strategy.running + len(rows))
            self._run(lambda observer: self.strategy.start(rows, observer), lambda: rows)

    def _skip_cancelled(self, planned: list[_Admitted]) -> list[_Admitted]:
        """Requests cancelled while they waited end now, without running."""
        cancelled = self.sinks.cancels.cancelled([a.sub.request_id for a in planned])
        for admitted in planned:
            if admitted.sub.request_id in cancelled:
                self._finish(admitted, batch_size=0)
        return [a for a in planned if a.sub.request_id not in cancelled]

    def _begin(self, starting: list[_Admitted], batch_size: int) -> None:
        now, ids = time.monotonic(), [a.sub.request_id for a in starting]
        for admitted in starting:
            admitted.started, admitted.peak = now, 0
        self.running = batch_size
        self.sinks.output.begin(ids, self.worker_name, batch_size)
        self.sinks.counter.count_execution(ids)

    def _run(self, step: Step, failed: Callable[[], list[BatchRow]]) -> None:
        """Run one step; on an error, ``failed`` names the rows that left the batch with it."""
        self._meter.busy(time.monotonic())
        try:
            output = step(self._observer)
        except Exception as error:  # noqa: BLE001 - isolated below, per request
            self._recover([self._requests[row.request_id] for row in failed()], error)
        else:
            self._update(output)
        self.running = self.strategy.running
        self._meter.settle(time.monotonic(), idle=not self.strategy.running)

    def _update(self, output: StepOutput) -> None:
        for row in output.stepped:
            admitted = self._requests[row.request_id]
            admitted.peak = max(admitted.peak, output.size, 1)
        for row in output.finished:
            self._meter.finished(len(row.state.tokens))
            admitted = self._requests[row.request_id]
            self._finish(admitted, admitted.peak)

    # ------------------------------------------------------------------ recover

    def _recover(self, failed: list[_Admitted], error: Exception) -> None:
        """A failed step's rows are retried to the end, in halves after out of memory, else one
        by one, so that only the culprit fails."""
        for admitted in failed:
            self._reset_row(admitted)
        out_of_memory = self.runner.is_out_of_memory(error)
        if len(failed) == 1:
            code = ErrorCode.OUT_OF_MEMORY if out_of_memory else ErrorCode.GENERATION_FAILED
            log.error("request %s failed: %r", failed[0].sub.request_id, error)
            self._fail(failed[0].sub, GenerationError(code, f"generation failed: {error}"))
            return
        if out_of_memory:
            self.stats.oom_splits += 1
            self.scheduler.on_out_of_memory(time.monotonic(), batch_cost([a.pending for a in failed]))
            log.warning("out of memory in a batch of %d; retrying in halves", len(failed))
            parts = split_for_retry(failed)
        else:
            log.warning("batch of %d failed (%s); retrying each request alone", len(failed), error)
            parts = [[admitted] for admitted in failed]
        for part in parts:
            self._retry(part)

    def _retry(self, part: list[_Admitted]) -> None:
        rows = [a.row for a in part]
        self._begin(part, len(rows))
        self._run(lambda observer: run_to_end(self.runner, rows, observer), lambda: rows)

    def _reset_row(self, admitted: _Admitted) -> None:
        # Text already streamed stays streamed: the retry continues after it (greedy and seeded
        # rows regenerate the same text), so clients never see a delta twice.
        old, sub = admitted.row, admitted.sub
        admitted.row = self.runner.new_row(sub.request_id, old.input_ids, sub.request)
        admitted.row.state.emitted = old.state.emitted
        admitted.started = None

    # ------------------------------------------------------------------ finish

    def _finish(self, admitted: _Admitted, batch_size: int) -> None:
        sub, row = admitted.sub, admitted.row
        del self._requests[sub.request_id]
        state, now = row.state, time.monotonic()
        if state.finish_reason is None:
            state.finish_reason = "cancelled"
        started = now if admitted.started is None else admitted.started
        ended = state.finished_at or now
        result = GenerationResult(
            id=row.request_id, text=state.emitted, prompt_tokens=len(row.input_ids),
            completion_tokens=len(state.tokens), finish_reason=state.finish_reason,
            worker=self.worker_name, batch_size=batch_size,
            queue_seconds=max(0.0, time.time() - (now - started) - sub.submitted_at),
            generate_seconds=ended - started,
            first_token_seconds=None if state.first_token_at is None else state.first_token_at - started,
            adapter=row.adapter)
        self.sinks.output.end(result)
        sub.future.set_result(result)

    def _fail(self, sub: Submission, error: FarmError) -> None:
        self._requests.pop(sub.request_id, None)
        self.stats.failed += 1
        result = GenerationResult.failed(sub.request_id, error, worker=self.worker_name)
        self.sinks.output.end(result)
        sub.future.set_result(result)
