"""The worker's heartbeat: a json record in Redis that the UI and ``farm status`` read."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from protocol.names import heartbeat_key
from worker.engine import Engine

log = logging.getLogger(__name__)


def heartbeat_record(engine: Engine, info: dict[str, Any]) -> dict[str, Any]:
    """What a worker says of itself: identity, model, load and recent batches."""
    stats = engine.stats
    recent = list(stats.recent)[-64:]
    window = [b for b in recent if b.at >= time.time() - 60]
    seconds = sum(b.seconds for b in window)
    return {
        **info,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "updated_at": time.time(),
        "batches": stats.batches,
        "requests": stats.requests,
        "failed": stats.failed,
        "tokens": stats.tokens,
        "oom_splits": stats.oom_splits,
        "running": engine.running,
        "waiting": engine.waiting,
        "mean_batch_size": (stats.requests / stats.batches) if stats.batches else 0.0,
        "tokens_per_second": (sum(b.tokens for b in window) / seconds) if seconds else 0.0,
        "recent_batches": [{"at": b.at, "size": b.size, "tokens": b.tokens, "seconds": b.seconds}
                           for b in recent],
    }


class Heartbeat:
    """Writes the record every ``interval`` seconds with an expiry of three intervals."""

    def __init__(self, client: redis.Redis, engine: Engine, name: str, info: dict[str, Any],
                 interval: float, extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.client, self.engine, self.name = client, engine, name
        self.info, self.interval = info, interval
        self.extra = extra
        """More live fields for the record (the metrics' latency summary)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.client.delete(heartbeat_key(self.name))
        except redis.RedisError:
            pass

    def beat(self) -> None:
        record = heartbeat_record(self.engine, self.info)
        if self.extra is not None:
            record.update(self.extra())
        ttl = max(1, int(self.interval * 3))
        self.client.set(heartbeat_key(self.name), json.dumps(record), ex=ttl)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except redis.RedisError as error:  # Redis restarting: beat again next time
                log.warning("heartbeat failed: %s", error)
            self._stop.wait(self.interval)
