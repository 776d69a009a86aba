"""``/v1/files``: files in Redis (shared by every API replica, never a replica's disk), with
OpenAI's file object. Blocking (redis-py): routes call it on the thread pool, the batch keeper
from its thread."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

from api.errors import ApiError, bad_field
from protocol.names import PREFIX
from protocol.settings import FarmSettings

PURPOSES = ("batch", "batch_output")
"""What a file may be for here: batch input (uploaded) and batch output (written by the farm)."""
MAX_BATCH_REQUESTS = 50000
"""Most lines of a batch input file, as OpenAI's."""
FILES = f"{PREFIX}files"
"""Sorted set: file id -> created_at."""


def file_key(file_id: str) -> str:
    return f"{PREFIX}file:{file_id}"


def content_key(file_id: str) -> str:
    return f"{PREFIX}file:{file_id}:content"


class FileStore:
    """Files and their metadata, each with an expiry (``FARM_FILE_TTL``)."""

    def __init__(self, client: redis.Redis, settings: FarmSettings) -> None:
        self.redis, self.settings = client, settings

    def create(self, content: bytes, filename: str, purpose: str, file_id: str | None = None) -> dict[str, Any]:
        now = int(time.time())
        ttl = self.settings.file_ttl
        file_id = file_id or f"file-{uuid.uuid4().hex}"
        record: dict[str, Any] = {"id": file_id, "object": "file", "bytes": len(content),
                  "created_at": now, "filename": filename, "purpose": purpose, "status": "processed",
                  "expires_at": now + ttl, "status_details": None}
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(content_key(file_id), content, ex=ttl)
        pipe.set(file_key(file_id), json.dumps(record), ex=ttl)
        pipe.zadd(FILES, {file_id: now})
        pipe.zremrangebyscore(FILES, 0, now - ttl)  # the expired ones
        pipe.execute()
        return record

    def get(self, file_id: str) -> dict[str, Any]:
        raw = self.redis.get(file_key(file_id))
        if raw is None:
            raise ApiError(404, f"No such file: {file_id!r}", "file_id", "file_not_found")
        return dict(json.loads(raw))

    def content(self, file_id: str) -> bytes:
        self.get(file_id)
        raw = self.redis.get(content_key(file_id))
        if raw is None:
            raise ApiError(404, f"No such file: {file_id!r}", "file_id", "file_not_found")
        return raw if isinstance(raw, bytes) else str(raw).encode()

    def delete(self, file_id: str) -> dict[str, Any]:
        self.get(file_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(file_key(file_id), content_key(file_id))
        pipe.zrem(FILES, file_id)
        pipe.execute()
        return {"id": file_id, "object": "file", "deleted": True}

    def listing(self, purpose: str | None, after: str | None, limit: int) -> dict[str, Any]:
        """Newest first, ``limit`` from the one after ``after``."""
        ids = [i.decode() for i in self.redis.zrevrange(FILES, 0, -1)]  # type: ignore[union-attr]
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1:]
        records = [json.loads(r) for r in self.redis.mget([file_key(i) for i in ids]) if r] if ids else []
        records = [r for r in records if purpose is None or r["purpose"] == purpose]
        page = records[:limit]
        return {"object": "list", "data": page, "has_more": len(records) > limit,
                "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


def check_upload(content: bytes, purpose: str, settings: FarmSettings) -> None:
    """An upload's size, purpose and (for a batch input) line count, before anything is stored."""
    if purpose != "batch":
        raise bad_field("purpose", f"must be 'batch' (the farm serves the Batch API), got {purpose!r}")
    if len(content) > settings.file_max_bytes:
        raise bad_field("file", f"is {len(content)} bytes, over the limit of {settings.file_max_bytes} "
                        "(FARM_FILE_MAX_BYTES)", "file_too_large")
    lines = sum(1 for line in content.splitlines() if line.strip())
    if lines > MAX_BATCH_REQUESTS:
        raise bad_field("file", f"has {lines} requests, over the limit of {MAX_BATCH_REQUESTS} per batch",
                        "too_many_requests")
    if not lines:
        raise bad_field("file", "is empty: a batch input file holds one request per line")


def page_limit(raw: str | None) -> int:
    if raw is None:
        return 20
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise bad_field("limit", f"must be an integer between 1 and 100, got {raw!r}")
    return int(raw)
