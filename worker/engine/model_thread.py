"""The model thread: Celery task threads ``submit`` and wait on a future; one thread runs the
engine core, so only it touches the model and no two threads ever run the same weights."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from protocol.schema import GenerationRequest, GenerationResult
from worker.engine.core import EngineCore, Submission
from worker.engine.scheduler import DynamicScheduler
from worker.engine.stats import EngineStats

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 0.2
"""How long an idle model thread waits for a submission before looking at its calls and stop flag."""


class Engine:
    """Accepts requests from any thread; the core batches and runs them on the model thread."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._inbox: queue.Queue[Submission] = queue.Queue()
        self._calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._futures: dict[str, Future[GenerationResult]] = {}
        self._thread = threading.Thread(target=self._loop, name="model-thread", daemon=True)

    @property
    def stats(self) -> EngineStats:
        return self.core.stats

    @property
    def running(self) -> int:
        return self.core.running

    @property
    def waiting(self) -> int:
        return self.core.waiting + self._inbox.qsize()

    @property
    def scheduler(self) -> DynamicScheduler:
        return self.core.scheduler

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
                self.core.admit(self._take(self.core.wait_time(time.monotonic())))
                self.core.step()
            except Exception:  # the model thread must survive anything a batch does
                log.exception("engine step failed")

    def _take(self, wait: float | None) -> list[Submission]:
        """New submissions: waits up to ``wait`` seconds for the first (``None``: idle), but never
        while rows wait for their next token (``0``)."""
        subs: list[Submission] = []
        if wait != 0.0:
            try:
                subs.append(self._inbox.get(timeout=IDLE_POLL_SECONDS if wait is None else wait))
            except queue.Empty:
                return subs
        while True:
            try:
                subs.append(self._inbox.get_nowait())
            except queue.Empty:
                return subs
