"""One way to open Redis: retries with backoff, so a Redis restart (append-only persistence
keeps the queues) is ridden out by workers and clients instead of failing their requests."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

RETRIES = 10
"""About 15 s of backoff in all (0.1 s doubling, capped at 2 s)."""


def connect(url: str, retries: int = RETRIES) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_connect_timeout=5, health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])
