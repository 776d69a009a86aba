"""Prometheus metrics of one worker process: what Flower cannot see from Celery's events.

Flower counts tasks; it cannot see batches, tokens, time to first token or the engine's queue.
The worker observes those at the engine's stream sink (every batch begins there and every
result ends there), so neither the engine nor the task code carries metrics calls.

Every metric lives in the worker's own ``CollectorRegistry`` served on ``FARM_METRICS_PORT``
(one port per worker process; ``0`` disables the endpoint).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from protocol.heartbeat import TOKENS_PER_SECOND_WINDOW, busy_tokens_per_second
from protocol.schema import GenerationResult

if TYPE_CHECKING:  # the engine imports torch; this module is imported before the model loads
    from worker.engine import Engine, StreamOutput

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
SUMMARY_WINDOW = 256
"""Results the heartbeat's latency summary averages over."""


class WorkerMetrics:
    """The worker's metrics, in a registry of their own (tests build several per process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.info = Info("farm_worker", "Worker identity: name, host, device, model, quantization", registry=r)
        self.batch_size = Histogram("farm_batch_size", "Requests per generate batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.requests = Counter("farm_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.tokens = Counter("farm_generated_tokens", "Completion tokens generated", registry=r)
        self.prompt_tokens = Counter("farm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.queue_wait = Histogram("farm_queue_wait_seconds", "Enqueue to batch start (broker + engine queue)",
                                    buckets=SECONDS_BUCKETS, registry=r)
        self.first_token = Histogram("farm_time_to_first_token_seconds",
                                     "Batch start to a request's first token (prefill)",
                                     buckets=SECONDS_BUCKETS, registry=r)
        self.decode_per_token = Histogram("farm_decode_seconds_per_token",
                                          "Decode time per token after the first",
                                          buckets=PER_TOKEN_BUCKETS, registry=r)
        self.generate = Histogram("farm_generate_seconds", "Batch start to a request's last token",
                                  buckets=SECONDS_BUCKETS, registry=r)
        self.in_flight = Gauge("farm_requests_in_flight", "Tasks of this worker between start and end",
                               registry=r)
        self.running = Gauge("farm_engine_running", "Requests in the batch being generated", registry=r)
        self.waiting = Gauge("farm_engine_waiting", "Requests waiting in the engine for a batch", registry=r)
        self.tokens_per_second = Gauge("farm_tokens_per_second",
                                       f"Completion tokens per second of busy time over the last "
                                       f"{TOKENS_PER_SECOND_WINDOW:.0f}s of batches", registry=r)
        self.oom_splits = Gauge("farm_oom_splits", "Batches split after running out of memory", registry=r)
        self._recent: deque[tuple[float, float | None, float | None]] = deque(maxlen=SUMMARY_WINDOW)
        self._tasks = 0
        self._lock = threading.Lock()

    def describe(self, info: dict[str, Any]) -> None:
        """Model and device of this worker, as labels of ``farm_worker_info``."""
        keys = ("name", "device", "cuda_visible_devices", "model", "model_name", "quant", "strategy", "host")
        self.info.info({k: str(info.get(k, "")) for k in keys})

    def watch_engine(self, engine: Engine) -> None:
        """Gauges read from the engine at scrape time (no calls in the engine's hot loop)."""
        self.running.set_function(lambda: float(engine.running))
        self.waiting.set_function(lambda: float(engine.waiting))
        self.oom_splits.set_function(lambda: float(engine.stats.oom_splits))
        self.tokens_per_second.set_function(lambda: busy_tokens_per_second(list(engine.stats.recent), time.time()))

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def observe_result(self, result: GenerationResult) -> None:
        self.requests.labels(result.finish_reason).inc()
        if result.error is not None or result.batch_size == 0:
            return  # refused or cancelled before a batch: no timings to report
        self.tokens.inc(result.completion_tokens)
        self.prompt_tokens.inc(result.prompt_tokens)
        self.queue_wait.observe(result.queue_seconds)
        self.generate.observe(result.generate_seconds)
        per_token = decode_seconds_per_token(result)
        if result.first_token_seconds is not None:
            self.first_token.observe(result.first_token_seconds)
        if per_token is not None:
            self.decode_per_token.observe(per_token)
        self._recent.append((result.queue_seconds, result.first_token_seconds, per_token))

    def task_started(self) -> None:
        with self._lock:
            self._tasks += 1
        self.in_flight.inc()

    def task_ended(self) -> None:
        with self._lock:
            self._tasks -= 1
        self.in_flight.dec()

    def summary(self) -> dict[str, float | int | None]:
        """Recent latencies for the heartbeat record (what ``farm status`` and the UI show)."""
        recent = list(self._recent)
        return {"in_flight": self._tasks,
                "queue_wait_seconds": _mean([q for q, _, _ in recent]),
                "first_token_seconds": _mean([t for _, t, _ in recent if t is not None]),
                "decode_seconds_per_token": _mean([d for _, _, d in recent if d is not None])}

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread."""
        start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)


def decode_seconds_per_token(result: GenerationResult) -> float | None:
    """Seconds per token after the first one (the first token's time is prefill)."""
    if result.first_token_seconds is None or result.completion_tokens < 2:
        return None
    return max(0.0, result.generate_seconds - result.first_token_seconds) / (result.completion_tokens - 1)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class MeteredSink:
    """A ``StreamOutput`` that passes everything on and observes batches and results on the way."""

    def __init__(self, inner: StreamOutput, metrics: WorkerMetrics) -> None:
        self.inner, self.metrics = inner, metrics

    def begin(self, request_ids: list[str], worker: str, batch_size: int) -> None:
        self.metrics.observe_batch(batch_size)
        self.inner.begin(request_ids, worker, batch_size)

    def write(self, deltas: dict[str, str], finished: list[str]) -> None:
        self.inner.write(deltas, finished)

    def end(self, result: GenerationResult) -> None:
        self.inner.end(result)
        self.metrics.observe_result(result)


def connect_task_signals(metrics: WorkerMetrics) -> Callable[[], None]:
    """Count tasks in flight with Celery's task signals; returns a function that disconnects them."""
    from celery.signals import task_postrun, task_prerun

    def started(**_: Any) -> None:
        metrics.task_started()

    def ended(**_: Any) -> None:
        metrics.task_ended()

    task_prerun.connect(started, weak=False)
    task_postrun.connect(ended, weak=False)

    def disconnect() -> None:
        task_prerun.disconnect(started)
        task_postrun.disconnect(ended)

    return disconnect
