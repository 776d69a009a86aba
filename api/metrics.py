"""Prometheus metrics of one API process (``/metrics``): requests, latency, time to first byte
and errors by endpoint, model and status. Labels never carry a key; ``model`` is only ever a
served model id (or ``-``), so a client cannot grow the series without bound."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LABELS = ("endpoint", "model", "status")


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("farm_api_requests", "API requests answered", LABELS, registry=self.registry)
        self.errors = Counter("farm_api_errors", "API requests answered with an error", (*LABELS, "code"),
                              registry=self.registry)
        self.latency = Histogram("farm_api_request_seconds", "Request to last byte", LABELS,
                                 buckets=BUCKETS, registry=self.registry)
        self.first_byte = Histogram("farm_api_first_byte_seconds", "Request to the first generated text",
                                    ("endpoint", "model"), buckets=BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Observation:
    """One request's measurements, recorded once when it ends."""

    metrics: ApiMetrics
    endpoint: str
    model: str = "-"
    started: float = field(default_factory=time.monotonic)
    first: float | None = None

    def first_byte(self) -> None:
        if self.first is None:
            self.first = time.monotonic()
            self.metrics.first_byte.labels(self.endpoint, self.model).observe(self.first - self.started)

    def done(self, status: int, code: str | None = None) -> None:
        labels = (self.endpoint, self.model, str(status))
        self.metrics.requests.labels(*labels).inc()
        self.metrics.latency.labels(*labels).observe(time.monotonic() - self.started)
        if status >= 400:
            self.metrics.errors.labels(*labels, code or "-").inc()
