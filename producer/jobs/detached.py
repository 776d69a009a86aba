"""Detached jobs: the registry of jobs that run with no client attached, and their rows.

A detached job's rows are stored in Redis (``JobKeys.input``, one json row per list item) since
no client iterator feeds it; its id is in ``DETACHED_JOBS`` until it ends. Whichever process runs
a ``JobRunner`` and wins the job's lease pumps it from those rows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

from protocol.errors import RequestError
from protocol.names import DETACHED_JOBS, JobKeys

from producer.connection import FarmConnection, as_text

PUSH = 1000
"""Rows pushed (or read) per round trip."""


class DetachedJobs:
    """The registry and the stored rows, on one farm's Redis."""

    def __init__(self, connection: FarmConnection) -> None:
        self.connection = connection
        self.redis = connection.redis

    def store_rows(self, job_id: str, rows: Iterable[Any]) -> int:
        """Store the job's rows unless stored already (a resubmission); returns how many there are."""
        key = JobKeys(job_id).input
        with self.connection.reachable():
            stored = int(self.redis.llen(key))
            if stored:
                return stored
            count = 0
            for part in _parts(rows):
                pipe = self.redis.pipeline(transaction=False)
                pipe.rpush(key, *(json.dumps(row) for row in part))
                pipe.expire(key, self.connection.settings.result_expires)
                pipe.execute()
                count += len(part)
        if not count:
            raise RequestError.for_field("prompts", "a detached job needs at least one row")
        return count

    def register(self, job_id: str) -> None:
        with self.connection.reachable():
            self.redis.zadd(DETACHED_JOBS, {job_id: time.time()}, nx=True)

    def remove(self, job_id: str) -> None:
        with self.connection.reachable():
            self.redis.zrem(DETACHED_JOBS, job_id)

    def ids(self) -> list[str]:
        """The detached jobs not ended, oldest first."""
        with self.connection.reachable():
            members: list[bytes] = self.redis.zrange(DETACHED_JOBS, 0, -1)  # type: ignore[assignment]
        return [as_text(i) for i in members]

    def rows(self, job_id: str, start: int = 0) -> Iterator[tuple[int, Any]]:
        """``(index, row)`` from row ``start``, read lazily ``PUSH`` at a time."""
        key = JobKeys(job_id).input
        index = start
        while True:
            with self.connection.reachable():
                part = self.redis.lrange(key, index, index + PUSH - 1)
            if not part:
                return
            for raw in part:
                yield index, json.loads(raw)
                index += 1


def _parts(rows: Iterable[Any]) -> Iterator[list[Any]]:
    part: list[Any] = []
    for row in rows:
        part.append(row)
        if len(part) == PUSH:
            yield part
            part = []
    if part:
        yield part
