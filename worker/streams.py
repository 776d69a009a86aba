"""The engine's sinks on Redis: partial text to streams, cancel flags, execution counters.

Each request has a stream of events ``start`` (worker, batch size), ``delta`` (text) and ``end``
(finish reason). Deltas are buffered and flushed in one pipeline at most every
``flush_interval`` seconds (``FARM_STREAM_FLUSH_MS``; at once for a first token or a finished
row), so a batch of 16 costs one round trip per flush, not 16 per token.
"""

from __future__ import annotations

import json
from typing import Any
import logging
import time

import redis

from protocol.names import cancel_key, executions_key, redeliveries_key, stream_key
from protocol.schema import GenerationResult
from protocol.settings import FarmSettings
from worker.engine.sinks import EngineSinks

log = logging.getLogger(__name__)


def redis_sinks(client: redis.Redis, settings: FarmSettings) -> EngineSinks:
    """The three sinks of a worker on its Redis."""
    return EngineSinks(RedisStreamSink(client, settings.stream_maxlen, settings.result_expires,
                                       settings.stream_flush_ms / 1000),
                       RedisCancelFlags(client), RedisExecutionCounter(client, bool(settings.count_executions)))


class RedisStreamSink:
    """``StreamOutput`` on Redis streams."""

    def __init__(self, client: redis.Redis, maxlen: int, ttl: int, flush_interval: float = 0.05) -> None:
        self.client, self.maxlen, self.ttl = client, maxlen, ttl
        self.flush_interval = flush_interval
        self._buffer: dict[str, str] = {}
        self._started: set[str] = set()
        self._last_flush = 0.0

    def begin(self, request_ids: list[str], worker: str, batch_size: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for request_id in request_ids:
            self._add(pipe, request_id, {"type": "start", "worker": worker, "batch_size": batch_size})
        _execute(pipe)
        self._started = set()

    def write(self, deltas: dict[str, str], finished: list[str]) -> None:
        first = any(rid not in self._started and text for rid, text in deltas.items())
        for request_id, text in deltas.items():
            if text:
                self._buffer[request_id] = self._buffer.get(request_id, "") + text
                self._started.add(request_id)
        if first or finished or time.monotonic() - self._last_flush >= self.flush_interval:
            self._flush()

    def end(self, result: GenerationResult) -> None:
        self._flush()
        pipe = self.client.pipeline(transaction=False)
        self._add(pipe, result.id, {"type": "end", "finish_reason": result.finish_reason,
                                    "error": result.error})
        _execute(pipe)

    def _flush(self) -> None:
        """Write buffered deltas, one round trip."""
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        pipe = self.client.pipeline(transaction=False)
        for request_id, text in self._buffer.items():  # the TTL set at "start" holds
            self._add(pipe, request_id, {"type": "delta", "text": text}, expire=False)
        self._buffer = {}
        _execute(pipe)

    def _add(self, pipe: redis.client.Pipeline, request_id: str, event: dict[str, object],
             expire: bool = True) -> None:
        key = stream_key(request_id)
        pipe.xadd(key, {"event": json.dumps(event)}, maxlen=self.maxlen, approximate=True)
        if expire:
            pipe.expire(key, self.ttl)


class RedisCancelFlags:
    """``CancelFlags`` from the cancel keys clients set."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def cancelled(self, request_ids: list[str]) -> set[str]:
        if not request_ids:
            return set()
        try:
            flags = self.client.mget([cancel_key(r) for r in request_ids])
        except redis.RedisError as error:
            log.warning("cancel flags unreadable (%s); running on", error)
            return set()
        return {r for r, flag in zip(request_ids, flags, strict=True) if flag}


class RedisExecutionCounter:
    """``ExecutionCounter`` in Redis hashes, when ``FARM_COUNT_EXECUTIONS`` is on (tests); else logs only."""

    def __init__(self, client: redis.Redis, enabled: bool) -> None:
        self.client, self.enabled = client, enabled

    def count_execution(self, request_ids: list[str]) -> None:
        if self.enabled and request_ids:
            pipe = self.client.pipeline(transaction=False)
            for request_id in request_ids:
                pipe.hincrby(executions_key(), request_id, 1)
            _execute(pipe)

    def note_redelivery(self, request_id: str) -> None:
        """A message came back after its worker died holding it (logged; counted for tests)."""
        log.info("redelivered: %s", request_id)
        if self.enabled:
            _execute(self.client.pipeline(transaction=False).hincrby(redeliveries_key(), request_id, 1))


def _execute(pipe: redis.client.Pipeline) -> list[Any] | None:
    """Streams are best effort: while Redis restarts, generation goes on and the result (stored
    by Celery, with retries) still carries the whole text."""
    try:
        return list(pipe.execute())
    except redis.RedisError as error:
        log.warning("stream write failed: %s", error)
        return None
