"""The batch records in Redis: OpenAI's batch object of each batch, written by ``api.batches``
and ``api.batch_keeper``, read by them and by the UI's Bulk tab (``ui.batches``).

Light on purpose (redis, ``producer`` and ``protocol`` only, no web framework or metrics), so
that any reader of the farm can list its batches with the API's own code.

Keys: ``batch_key(id)`` a hash with ``object`` (the batch object, json) and ``end`` (the status
it ends in once its rows are over); ``lines_key(id)`` the input lines (json); ``BATCHES`` the
listing; ``ACTIVE`` the batches not at their end yet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis

from producer import FarmClient
from protocol.names import PREFIX

BATCHES = f"{PREFIX}batches"
"""Sorted set: batch id -> created_at (the listing)."""
ACTIVE = f"{PREFIX}batches:active"
"""Set of the batches not at their end yet (what the keeper looks at)."""
LIVE = ("in_progress", "cancelling", "finalizing")
"""Statuses whose request counts are read from the job while it runs."""
FINAL_AT = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}


def batch_key(batch_id: str) -> str:
    return f"{PREFIX}batch:{batch_id}"


def lines_key(batch_id: str) -> str:
    return f"{PREFIX}batch:{batch_id}:lines"


def new_batch(batch_id: str, endpoint: str, input_file_id: str, metadata: dict[str, str] | None,
              window: int) -> dict[str, Any]:
    now = int(time.time())
    return {"id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": "24h", "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + window, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata}


def stamp(status: str, field: str) -> Callable[[dict[str, Any]], None]:
    """A change that sets the status and its ``*_at`` time."""
    def change(batch: dict[str, Any]) -> None:
        batch["status"], batch[field] = status, int(time.time())
    return change


class BatchStore:
    """Batch records in Redis; every change of status is one optimistic transaction."""

    def __init__(self, client: FarmClient) -> None:
        self.client = client
        self.redis: redis.Redis = client.redis
        self.ttl = client.settings.file_ttl

    # --- reading ------------------------------------------------------------------------------
    def find(self, batch_id: str) -> dict[str, Any] | None:
        """The stored batch object, or None (never made, or expired)."""
        raw = self.redis.hget(batch_key(batch_id), "object")
        return None if raw is None else dict(json.loads(raw))

    def current(self, batch_id: str) -> dict[str, Any] | None:
        """The batch object as ``GET /v1/batches/{id}`` answers it: a running batch's request
        counts read live from its job."""
        batch = self.find(batch_id)
        if batch is not None and batch["status"] in LIVE:
            batch["request_counts"] = self.live_counts(batch)
        return batch

    def live_counts(self, batch: dict[str, Any]) -> dict[str, int]:
        """Lines answered so far, from the job's rows (a line of ``n`` choices is ``n`` rows)."""
        total = batch["request_counts"]["total"]
        with self.client.job(batch["id"]) as job:
            progress = job.progress()
        rows = progress.total or total
        return {"total": total, "completed": progress.done * total // max(rows, 1),
                "failed": progress.failed * total // max(rows, 1)}

    def listing(self, after: str | None, limit: int) -> dict[str, Any]:
        """``GET /v1/batches``: newest first, ``limit`` from the one after ``after``."""
        ids, more = self.page(after, limit)
        data = [b for b in map(self.current, ids) if b is not None]
        return {"object": "list", "data": data, "has_more": more,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    def page(self, after: str | None, limit: int) -> tuple[list[str], bool]:
        ids = [i.decode() for i in self.redis.zrevrange(BATCHES, 0, -1)]  # type: ignore[union-attr]
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1:]
        return ids[:limit], len(ids) > limit

    def end(self, batch_id: str) -> str:
        """The status the batch ends in once its rows are over (completed, cancelled, expired)."""
        raw = self.redis.hget(batch_key(batch_id), "end")
        return raw.decode() if isinstance(raw, bytes) else "completed"

    def lines(self, batch_id: str) -> list[Any]:
        """The input lines as stored (``api.batch_input.BatchLine.to_json`` items)."""
        raw = self.redis.get(lines_key(batch_id))
        return list(json.loads(raw or b"[]"))

    def active(self) -> list[str]:
        return sorted(i.decode() for i in self.redis.smembers(ACTIVE))  # type: ignore[union-attr]

    # --- writing ------------------------------------------------------------------------------
    def put(self, batch: dict[str, Any], lines: list[Any] | None = None) -> None:
        """Store the batch object (and its input lines, json items, when given)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(batch_key(batch["id"]), "object", json.dumps(batch))
        pipe.expire(batch_key(batch["id"]), self.ttl)
        pipe.zadd(BATCHES, {batch["id"]: batch["created_at"]})
        if lines is not None:
            pipe.set(lines_key(batch["id"]), json.dumps(lines), ex=self.ttl)
        pipe.execute()

    def update(self, batch_id: str, allowed: tuple[str, ...], change: Callable[[dict[str, Any]], None],
               end: str | None = None) -> dict[str, Any] | None:
        """Apply ``change`` to the batch if its status is one of ``allowed``; the new object, or
        None when its status was another (another replica moved it first)."""
        def apply(pipe: Any) -> dict[str, Any] | None:
            raw = pipe.hget(batch_key(batch_id), "object")
            batch = json.loads(raw) if raw else None
            if batch is None or batch["status"] not in allowed:
                return None
            change(batch)
            pipe.multi()
            pipe.hset(batch_key(batch_id), "object", json.dumps(batch))
            if end is not None:
                pipe.hset(batch_key(batch_id), "end", end)
            return dict(batch)
        result = self.redis.transaction(apply, batch_key(batch_id), value_from_callable=True)  # type: ignore[arg-type]
        return result if isinstance(result, dict) else None

    def set_active(self, batch_id: str, active: bool) -> None:
        (self.redis.sadd if active else self.redis.srem)(ACTIVE, batch_id)
