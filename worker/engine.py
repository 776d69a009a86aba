"""The engine: one model thread that glues the pure scheduler to the model runner.

Celery task threads call ``submit`` and wait on the returned future; only the model thread
touches the model, so no two threads ever run ``generate`` on the same weights.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol.errors import ErrorCode, FarmError, GenerationError, RequestError
from protocol.schema import GenerationRequest, GenerationResult
from worker.runner import BatchRow, ModelRunner
from worker.scheduler import DynamicScheduler, Pending, batch_cost, split_for_retry

log = logging.getLogger(__name__)


class StreamSink(Protocol):
    """Where partial text goes (Redis streams in production)."""

    def begin(self, request_ids: list[str], worker: str, batch_size: int) -> None: ...
    def on_step(self, deltas: dict[str, str], finished: list[str]) -> set[str]: ...
    def end(self, result: GenerationResult) -> None: ...
    def cancelled(self, request_ids: list[str]) -> set[str]: ...
    def count_execution(self, request_ids: list[str]) -> None: ...


@dataclass
class Submission:
    request_id: str
    request: GenerationRequest
    submitted_at: float
    """Client's wall-clock time of enqueueing (for queue_seconds)."""
    priority: int
    future: Future[GenerationResult] = field(default_factory=Future)


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


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OOM error, a host ``MemoryError``, or an allocator message saying so."""
    import torch

    if isinstance(error, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


class Engine:
    """Accepts requests from any thread; batches and runs them on its own model thread."""

    def __init__(self, runner: ModelRunner, scheduler: DynamicScheduler, sink: StreamSink,
                 worker_name: str, render: RenderFn, max_prompt_tokens: int) -> None:
        self.runner, self.scheduler, self.sink = runner, scheduler, sink
        self.worker_name, self.render, self.max_prompt_tokens = worker_name, render, max_prompt_tokens
        self.stats = EngineStats()
        self._inbox: queue.Queue[Submission] = queue.Queue()
        self._calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._rows: dict[str, tuple[Submission, BatchRow]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._futures: dict[str, Future[GenerationResult]] = {}
        self._thread = threading.Thread(target=self._loop, name="model-thread", daemon=True)
        self.running = 0

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting) + self._inbox.qsize()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def submit(self, request_id: str, request: GenerationRequest, submitted_at: float,
               priority: int = 0) -> Future[GenerationResult]:
        """Queue a request for the model thread; the future resolves with its result."""
        with self._lock:
            if request_id in self._futures:  # a redelivered duplicate shares the running one
                return self._futures[request_id]
            sub = Submission(request_id, request, submitted_at, priority)
            self._futures[request_id] = sub.future
        sub.future.add_done_callback(lambda _: self._forget(request_id))
        self._inbox.put(sub)
        return sub.future

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the model thread between batches (or decode steps): the only safe time
        to change the model, e.g. to load an adapter."""
        future: Future[Any] = Future()
        self._calls.put((fn, future))
        return future

    def _run_calls(self) -> None:
        while not self._calls.empty():
            fn, future = self._calls.get_nowait()
            try:
                future.set_result(fn())
            except Exception as error:  # noqa: BLE001 - handed to the caller
                future.set_exception(error)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._futures.pop(request_id, None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._run_calls()
                self._tick()
            except Exception:  # the model thread must survive anything a batch does
                log.exception("engine step failed")

    def _tick(self) -> None:
        self._admit(self._take_inbox(self.scheduler.wait_time(time.monotonic())))
        batch = self.scheduler.next_batch(time.monotonic())
        if batch:
            self._run(batch)

    def _take_inbox(self, wait: float | None) -> list[Submission]:
        subs: list[Submission] = []
        try:
            subs.append(self._inbox.get(timeout=0.2 if wait is None else max(wait, 0.0005)))
        except queue.Empty:
            return subs
        while True:
            try:
                subs.append(self._inbox.get_nowait())
            except queue.Empty:
                return subs

    def _admit(self, subs: list[Submission]) -> None:
        for sub in subs:
            try:
                row = self._prepare(sub)
            except FarmError as error:
                self._fail(sub, error)
                continue
            self._rows[sub.request_id] = (sub, row)
            group = "" if self.runner.mixes_adapters else row.adapter  # mixed-adapter batches
            self.scheduler.add(Pending(sub.request_id, len(row.input_ids), sub.request.max_new_tokens,
                                       time.monotonic(), sub.priority, group))

    def _prepare(self, sub: Submission) -> BatchRow:
        """Template and tokenize in the model thread (fast tokenizers are not thread-safe)."""
        text = self.render(sub.request)
        ids = self.runner.encode(text)
        if len(ids) > self.max_prompt_tokens:
            raise RequestError.for_field(
                "prompt", f"is {len(ids)} tokens, over the limit of {self.max_prompt_tokens}",
                ErrorCode.PROMPT_TOO_LONG)
        return self.runner.new_row(sub.request_id, ids, sub.request)

    def _run(self, batch: list[Pending]) -> None:
        ids = [p.request_id for p in batch]
        cancelled = self.sink.cancelled(ids)
        for request_id in cancelled:
            self._finish(request_id, batch_size=0, started=time.monotonic())
        live = [p for p in batch if p.request_id not in cancelled]
        if live:
            self._execute(live)

    def _execute(self, batch: list[Pending]) -> None:
        rows = [self._rows[p.request_id][1] for p in batch]
        started = time.monotonic()
        self.running = len(rows)
        self.sink.begin([r.request_id for r in rows], self.worker_name, len(rows))
        self.sink.count_execution([r.request_id for r in rows])
        try:
            self.runner.run(rows, self.sink)
        except Exception as error:  # noqa: BLE001 - isolated below, per request
            self._recover(batch, error)
            return
        finally:
            self.running = 0
        self.stats.record(len(rows), sum(len(r.state.tokens) for r in rows), time.monotonic() - started)
        for row in rows:
            self._finish(row.request_id, len(rows), started)

    def _recover(self, batch: list[Pending], error: Exception) -> None:
        """A failed batch is split and retried so that no request fails for its neighbours."""
        for p in batch:
            self._reset_row(p.request_id)
        if is_out_of_memory(error) and len(batch) > 1:
            self.stats.oom_splits += 1
            self.scheduler.on_out_of_memory(time.monotonic(), batch_cost(batch))
            log.warning("out of memory in a batch of %d; retrying in halves", len(batch))
            for part in split_for_retry(batch):
                self._execute(part)
            return
        if len(batch) > 1:
            log.warning("batch of %d failed (%s); retrying each request alone", len(batch), error)
            for p in batch:
                self._execute([p])
            return
        code = ErrorCode.OUT_OF_MEMORY if is_out_of_memory(error) else ErrorCode.GENERATION_FAILED
        log.error("request %s failed: %r", batch[0].request_id, error)
        self._fail(self._rows.pop(batch[0].request_id)[0], GenerationError(code, f"generation failed: {error}"))

    def _reset_row(self, request_id: str) -> None:
        # Text already streamed stays streamed: the retry continues after it (greedy and seeded
        # rows regenerate the same text), so clients never see a delta twice.
        sub, row = self._rows[request_id]
        fresh = self.runner.new_row(request_id, row.input_ids, sub.request)
        fresh.state.emitted = row.state.emitted
        self._rows[request_id] = (sub, fresh)

    def _finish(self, request_id: str, batch_size: int, started: float) -> None:
        sub, row = self._rows.pop(request_id)
        state = row.state
        if state.finish_reason is None:
            state.finish_reason = "cancelled"
        ended = state.finished_at or time.monotonic()
        started_wall = time.time() - (time.monotonic() - started)
        result = GenerationResult(
            id=request_id, text=state.emitted, prompt_tokens=len(row.input_ids),
            completion_tokens=len(state.tokens), finish_reason=state.finish_reason,
            worker=self.worker_name, batch_size=batch_size,
            queue_seconds=max(0.0, started_wall - sub.submitted_at),
            generate_seconds=ended - started,
            first_token_seconds=None if state.first_token_at is None else state.first_token_at - started,
            adapter=row.adapter)
        self.sink.end(result)
        sub.future.set_result(result)

    def _fail(self, sub: Submission, error: FarmError) -> None:
        self.stats.failed += 1
        result = GenerationResult.failed(sub.request_id, error, worker=self.worker_name)
        self.sink.end(result)
        sub.future.set_result(result)


class RenderFn(Protocol):
    def __call__(self, request: GenerationRequest) -> str: ...
