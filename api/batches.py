"""``/v1/batches``: OpenAI's batch object over a detached bulk job of the farm.

A batch ``batch_X`` is the job ``batch_X``: its rows are the farm requests of its input lines, on
the bulk queue, pumped by the job runner of any API replica. The batch record (the object as
OpenAI returns it, every field present) lives in Redis (``api.batch_store``, which the UI reads
too); ``api.batch_keeper`` moves it to its end.
Blocking (redis-py and ``FarmClient``): the routes call it on the thread pool.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from api.batch_input import ENDPOINTS, check_input
from api.batch_store import BatchStore, new_batch, stamp
from api.errors import ApiError, bad_field
from api.files import FileStore
from producer import FarmClient
from protocol.schema import Limits

WINDOWS = ("24h",)
MAX_METADATA = 16


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
        self.store.put(batch, [line.to_json() for line in checked.lines])
        self.store.set_active(batch["id"], True)
        return batch

    def get(self, batch_id: str) -> dict[str, Any]:
        """The batch object, its request counts live while it runs; 404 if there is none."""
        batch = self.store.current(batch_id)
        if batch is None:
            raise not_found(batch_id)
        return batch

    def listing(self, after: str | None, limit: int) -> dict[str, Any]:
        return self.store.listing(after, limit)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """``cancelling`` at once; the keeper makes it ``cancelled`` once the rows in flight end."""
        batch = self.store.update(batch_id, ("validating", "in_progress"), stamp("cancelling", "cancelling_at"),
                                  end="cancelled")
        if batch is None:
            batch = self.get(batch_id)
            if batch["status"] in ("cancelling", "cancelled"):
                return batch
            raise ApiError(409, f"Cannot cancel a batch with status {batch['status']!r}", "batch_id",
                           "batch_not_cancellable")
        with self.client.job(batch_id) as job:
            job.cancel()
        return self.get(batch_id)


def not_found(batch_id: str) -> ApiError:
    return ApiError(404, f"No such batch: {batch_id!r}", "batch_id", "batch_not_found")


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
