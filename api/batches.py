"""``/v1/batches``: OpenAI's batch object over a detached bulk job of the farm.

A batch ``batch_X`` is the job ``batch_X``: its rows are the farm requests of its input lines, on
the bulk queue, pumped by the job runner of any API replica. The batch record (the object as
OpenAI returns it, every field present) lives in Redis; ``api.batch_keeper`` moves it to its end.
Blocking (redis-py and ``FarmClient``): the routes call it on the thread pool.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from api.batch_input import ENDPOINTS, BatchLine, check_input
from api.errors import ApiError, bad_field
from api.files import FileStore
from producer import FarmClient
from protocol.names import PREFIX
from protocol.schema import Limits

BATCHES = f"{PREFIX}batches"
"""Sorted set: batch id -> created_at (the listing)."""
ACTIVE = f"{PREFIX}batches:active"
"""Set of the batches not at their end yet (what the keeper looks at)."""
WINDOWS = ("24h",)
LIVE = ("in_progress", "cancelling", "finalizing")
"""Statuses whose request counts are read from the job while it runs."""
FINAL_AT = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}
MAX_METADATA = 16


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


class BatchStore:
    """Batch records in Redis; every change of status is one optimistic transaction."""

    def __init__(self, client: FarmClient) -> None:
        self.client = client
        self.redis: redis.Redis = client.redis
        self.ttl = client.settings.file_ttl

    def get(self, batch_id: str) -> dict[str, Any]:
        raw = self.redis.hget(batch_key(batch_id), "object")
        if raw is None:
            raise ApiError(404, f"No such batch: {batch_id!r}", "batch_id", "batch_not_found")
        return dict(json.loads(raw))

    def end(self, batch_id: str) -> str:
        """The status the batch ends in once its rows are over (completed, cancelled, expired)."""
        raw = self.redis.hget(batch_key(batch_id), "end")
        return raw.decode() if isinstance(raw, bytes) else "completed"

    def put(self, batch: dict[str, Any], lines: list[BatchLine] | None = None) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(batch_key(batch["id"]), "object", json.dumps(batch))
        pipe.expire(batch_key(batch["id"]), self.ttl)
        pipe.zadd(BATCHES, {batch["id"]: batch["created_at"]})
        if lines is not None:
            pipe.set(lines_key(batch["id"]), json.dumps([line.to_json() for line in lines]), ex=self.ttl)
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

    def lines(self, batch_id: str) -> list[BatchLine]:
        raw = self.redis.get(lines_key(batch_id))
        return [BatchLine.from_json(item) for item in json.loads(raw or b"[]")]

    def active(self) -> list[str]:
        return sorted(i.decode() for i in self.redis.smembers(ACTIVE))  # type: ignore[union-attr]

    def set_active(self, batch_id: str, active: bool) -> None:
        (self.redis.sadd if active else self.redis.srem)(ACTIVE, batch_id)

    def page(self, after: str | None, limit: int) -> tuple[list[str], bool]:
        ids = [i.decode() for i in self.redis.zrevrange(BATCHES, 0, -1)]  # type: ignore[union-attr]
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1:]
        return ids[:limit], len(ids) > limit


def stamp(status: str, field: str) -> Callable[[dict[str, Any]], None]:
    """A change that sets the status and its ``*_at`` time."""
    def change(batch: dict[str, Any]) -> None:
        batch["status"], batch[field] = status, int(time.time())
    return change


class Batches:
    """Create, read, list and cancel batches."""

    def __init__(self, client: FarmClient, files: FileStore) -> None:
        self.client, self.files, self.store = client, files, BatchStore(client)

    def create(self, body: Any, served: dict[str, str | None], limits: Limits) -> dict[str, Any]:
        endpoint, input_file_id, metadata = _create_fields(body)
        source = self.files.get(input_file_id)
        if source["purpose"] != "batch":
            raise bad_field("input_file_id", f"file {input_file_id} has purpose {source['purpose']!r}, not 'batch'")
        batch = new_batch(f"batch_{uuid.uuid4().hex}", endpoint, input_file_id, metadata,
                          self.client.settings.batch_window_seconds)
        self.store.put(batch)
        checked = check_input(self.files.content(input_file_id), endpoint, served, limits)
        if checked.errors:
            batch.update(status="failed", failed_at=int(time.time()),
                         errors={"object": "list", "data": checked.errors})
            self.store.put(batch)
            return batch
        self.client.submit_job(checked.rows, batch["id"], detach=True).close()
        batch.update(status="in_progress", in_progress_at=int(time.time()),
                     request_counts={"total": len(checked.lines), "completed": 0, "failed": 0})
        self.store.put(batch, checked.lines)
        self.store.set_active(batch["id"], True)
        return batch

    def get(self, batch_id: str) -> dict[str, Any]:
        batch = self.store.get(batch_id)
        if batch["status"] in LIVE:
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
        ids, more = self.store.page(after, limit)
        data = [self.get(i) for i in ids if self.store.redis.exists(batch_key(i))]
        return {"object": "list", "data": data, "has_more": more,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """``cancelling`` at once; the keeper makes it ``cancelled`` once the rows in flight end."""
        batch = self.store.update(batch_id, ("validating", "in_progress"), stamp("cancelling", "cancelling_at"),
                                  end="cancelled")
        if batch is None:
            batch = self.store.get(batch_id)
            if batch["status"] in ("cancelling", "cancelled"):
                return batch
            raise ApiError(409, f"Cannot cancel a batch with status {batch['status']!r}", "batch_id",
                           "batch_not_cancellable")
        with self.client.job(batch_id) as job:
            job.cancel()
        return self.get(batch_id)


def _create_fields(body: Any) -> tuple[str, str, dict[str, str] | None]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_request")
    endpoint, file_id, window = body.get("endpoint"), body.get("input_file_id"), body.get("completion_window")
    if endpoint not in ENDPOINTS:
        raise bad_field("endpoint", f"must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    if not isinstance(file_id, str) or not file_id:
        raise bad_field("input_file_id", "is required: the id of a file uploaded with purpose 'batch'")
    if window not in WINDOWS:
        raise bad_field("completion_window", f"must be '24h', got {window!r}")
    return endpoint, file_id, _metadata(body.get("metadata"))


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in value.items()):
        raise bad_field("metadata", f"must be at most {MAX_METADATA} string pairs (keys up to 64 characters, "
                        "values up to 512)")
    return dict(value)
