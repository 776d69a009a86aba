"""The API's one seam to the farm: every call that touches the farm (its Redis, its Celery app,
its heartbeats) is here, on ``FarmClient``'s public API and ``protocol`` only.

Blocking ``FarmClient`` calls (enqueueing through Celery, reading a stored result) run on the
event loop's thread pool; they are short. Waiting is not: each request's Redis stream is followed
with ``redis.asyncio`` (``XREAD BLOCK``), so an idle connection costs a coroutine, not a thread.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import PurePath
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from celery.states import READY_STATES

from producer import FarmClient
from producer.connection import result_from_meta
from protocol.errors import ErrorCode, FarmUnavailable
from protocol.names import INTERACTIVE_QUEUE, stream_key
from protocol.schema import GenerationRequest, GenerationResult, Limits
from protocol.settings import FarmSettings

T = TypeVar("T")
WORKERS_TTL = 1.0
"""Seconds a heartbeat scan is reused: a burst of requests costs one scan, not one each."""
DEPTH_TTL = 0.2
"""Seconds a queue depth is reused (the full-queue check is approximate across replicas anyway)."""
REDIS_CONNECTIONS = 4096
"""Each waiting request blocks on one connection (redis-py's default pool holds 100); beyond
this many at once a replica answers 503 (Redis's own default limit is 10000 clients)."""
RESULT_POLL_S = 0.002
BLOCK_MS = 1000
"""Longest wait on the streams before the caller checks its client is still there."""
RESULT_TIMEOUT = 60.0
"""The stored result follows the stream's end event by milliseconds; this only bounds a bug."""
ADAPTER_SEPARATOR = ":"


class Farm:
    """One per API process; shared by all its connections."""

    def __init__(self, settings: FarmSettings) -> None:
        self.settings = settings
        self.client = FarmClient(settings=settings)
        self.redis = aioredis.Redis.from_url(settings.redis_url, health_check_interval=30,
                                             max_connections=REDIS_CONNECTIONS)
        """Streams and the per-key counters (``api.keys``)."""
        self._workers: tuple[float, list[dict[str, Any]]] = (0.0, [])
        self._depth: tuple[float, int] = (0.0, 0)

    async def close(self) -> None:
        await self.redis.aclose()

    # --- the farm's state -------------------------------------------------------------------
    async def workers(self) -> list[dict[str, Any]]:
        """Heartbeats of the ready workers (cached for ``WORKERS_TTL``)."""
        at, cached = self._workers
        if time.monotonic() - at < WORKERS_TTL:
            return cached
        fresh = [w for w in await _blocking(self.client.workers) if w.get("ready")]
        self._workers = (time.monotonic(), fresh)
        return fresh

    async def queue_depth(self) -> int:
        """Messages waiting in the interactive queues, every model's (cached for ``DEPTH_TTL``)."""
        at, depth = self._depth
        if time.monotonic() - at >= DEPTH_TTL:
            depths = await _blocking(self.client.queue_depths)
            depth = sum(n for queue, n in depths.items() if queue.split(".")[0] == INTERACTIVE_QUEUE)
            self._depth = (time.monotonic(), depth)
        return depth

    async def ping(self) -> None:
        await _reachable(self.settings, self.redis.ping())

    def limits(self, workers: list[dict[str, Any]]) -> Limits:
        adapters = sorted({a for w in workers for a in w.get("adapters", [])})
        return Limits.from_settings(self.settings, adapters or None)

    # --- requests -----------------------------------------------------------------------------
    async def send(self, requests: list[GenerationRequest], queue: str = INTERACTIVE_QUEUE) -> list[str]:
        """Enqueue validated requests (on the interactive queue unless told); their request ids."""
        def send_all() -> list[str]:
            return [self.client.send(r, queue=queue).id for r in requests]
        return await _blocking(send_all)

    async def cancel(self, request_ids: list[str]) -> None:
        def cancel_all() -> None:
            for request_id in request_ids:
                self.client.cancel(request_id)
        await _blocking(cancel_all)

    async def results(self, request_ids: list[str]) -> list[GenerationResult]:
        """The stored results; the end of a stream precedes them by a moment, so wait for them
        here (on the event loop) and read them once they are all stored."""
        backend = self.client.app.backend
        keys = [backend.get_key_for_task(r) for r in request_ids]
        deadline = time.monotonic() + RESULT_TIMEOUT
        while time.monotonic() <= deadline:
            # Read and decode them here once stored: no thread, and no second read of the streams
            # (FarmClient's wait follows each stream from its start before reading the result).
            raws = await _reachable(self.settings, self.redis.mget(keys))
            metas = [None if raw is None else backend.decode_result(raw) for raw in raws]
            if all(m is not None and m.get("status") in READY_STATES for m in metas):
                return [result_from_meta(r, dict(m or {})) for r, m in zip(request_ids, metas, strict=True)]
            await asyncio.sleep(RESULT_POLL_S)

        def read_all() -> list[GenerationResult]:  # FarmClient's own wait reports the timeout
            return [self.client.handle(r).result(RESULT_TIMEOUT) for r in request_ids]
        return await _blocking(read_all)

    async def events(self, request_ids: list[str]) -> AsyncGenerator[tuple[int, dict[str, Any]], None]:
        """``(index, event)`` from the requests' streams, in order per request, until every one
        has ended; ``(-1, {"type": "idle"})`` after each ``BLOCK_MS`` without events. A request
        refused by its worker before it reached a batch has no stream: its result ends it."""
        cursors = {i: "0" for i in range(len(request_ids))}
        while cursors:
            streams: dict[Any, Any] = {stream_key(request_ids[i]): after for i, after in cursors.items()}
            reply = await _reachable(self.settings, self.redis.xread(streams, count=1000, block=BLOCK_MS))
            if not reply:
                for i in await self._finished_silently(request_ids, list(cursors)):
                    del cursors[i]
                    yield i, {"type": "end", "finish_reason": None}
                yield -1, {"type": "idle"}
                continue
            for i, event_id, event in _parse(reply, request_ids):
                cursors[i] = event_id
                if event.get("type") == "end":
                    del cursors[i]
                yield i, event

    async def _finished_silently(self, request_ids: list[str], waiting: list[int]) -> list[int]:
        pipe = self.redis.pipeline(transaction=False)
        for i in waiting:
            pipe.exists(self.client.app.backend.get_key_for_task(request_ids[i]))
        stored = await _reachable(self.settings, pipe.execute())
        return [i for i, found in zip(waiting, stored, strict=True) if found]

def served_models(workers: list[dict[str, Any]]) -> dict[str, str | None]:
    """Model ids the workers serve, each with the adapter a request for it asks for: the model's
    public name (``FARM_MODEL_NAME``, the routing name; else the last part of its path, for an
    older worker) with the farm's default adapter, and ``model:adapter`` for each adapter."""
    served: dict[str, str | None] = {}
    for worker in workers:
        model = str(worker.get("model_name") or model_id(str(worker.get("model", ""))))
        served.setdefault(model, None)
        for adapter in worker.get("adapters", []):
            served.setdefault(f"{model}{ADAPTER_SEPARATOR}{adapter}", str(adapter))
    return served


def model_id(path: str) -> str:
    return PurePath(path.rstrip("/")).name or path or "model"


def _parse(reply: Any, request_ids: list[str]) -> list[tuple[int, str, dict[str, Any]]]:
    index = {stream_key(r): i for i, r in enumerate(request_ids)}
    out = []
    for key, entries in reply:
        i = index[_text(key)]
        out += [(i, _text(eid), json.loads(fields[b"event"])) for eid, fields in entries]
    return out


async def _blocking(call: Callable[[], T]) -> T:
    return await asyncio.to_thread(call)


async def _reachable(settings: FarmSettings, call: Awaitable[T]) -> T:
    try:
        return await call
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise FarmUnavailable(ErrorCode.REDIS_UNREACHABLE, (
            f"Redis at {settings.redacted_redis_url()} is unreachable ({error})")) from None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
