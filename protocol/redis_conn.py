"""One way to open Redis: retries with backoff, so a Redis restart (append-only persistence
keeps the queues) is ridden out by workers and clients instead of failing their requests; and
socket timeouts, so a Redis that accepts connections and never answers fails within seconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from protocol.settings import FarmSettings

T = TypeVar("T")

RETRIES = 10
"""About 15 s of backoff in all (0.1 s doubling, capped at 2 s)."""
BACKOFF_BASE, BACKOFF_CAP = 0.1, 2.0


class BoundedRetry(Retry):  # type: ignore[misc]
    """redis-py's retry, that also gives up once ``budget`` seconds have passed since the call
    began. redis-py retries the connect inside a command's retry, so against a Redis that
    never answers the counts multiply (4 x 4 tries of a 3 s timeout: 55 s measured)."""

    def __init__(self, retries: int, budget: float) -> None:
        super().__init__(ExponentialBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE), retries,
                         supported_errors=(redis.ConnectionError, redis.TimeoutError))
        self.budget = budget

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        deadline = time.monotonic() + self.budget

        def retryable(error: Exception) -> bool:
            return time.monotonic() < deadline and (is_retryable is None or is_retryable(error))

        return super().call_with_retry(do, fail, retryable, with_failure_count)  # type: ignore[no-any-return]


def backoff_total(retries: int) -> float:
    """Seconds slept between ``retries`` retries."""
    return sum(min(BACKOFF_CAP, BACKOFF_BASE * 2 ** i) for i in range(retries))


def connect(url: str, retries: int = RETRIES, settings: FarmSettings | None = None) -> redis.Redis:
    """A client of ``url``; ``settings`` give its socket timeouts (their defaults without). A
    call gives up after its retries, or after their backoff plus one socket timeout."""
    settings = settings or FarmSettings(redis_url=url)
    budget = backoff_total(retries) + settings.redis_socket_timeout
    return redis.Redis.from_url(
        url, socket_connect_timeout=settings.redis_connect_timeout, socket_timeout=settings.redis_socket_timeout,
        health_check_interval=30, retry=BoundedRetry(retries, budget),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])
