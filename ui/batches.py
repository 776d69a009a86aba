"""The Bulk tab's list of the batches made through the HTTP Batch API (``POST /v1/batches``),
read from the records the API writes, with the API's own store (``api.batch_store``): the same
objects, live request counts included, as ``GET /v1/batches`` answers.

No Gradio here: ``ui.bulk`` shows the frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pandas as pd

from api.batch_store import BatchStore
from producer.client import FarmClient
from protocol.errors import FarmError

BATCH_COLUMNS = ["batch", "status", "requests", "created", "output file", "error file"]
SHOWN = 20
"""The newest batches listed (``GET /v1/batches``' default page)."""
CREATED_FORMAT = "%Y-%m-%d %H:%M:%S"


@dataclass(frozen=True)
class BatchesView:
    note: str
    batches: pd.DataFrame


def batches_view(client: FarmClient) -> BatchesView:
    """The newest batches; an unreachable Redis is a message, not an exception."""
    try:
        with client.connection.reachable():
            listing = BatchStore(client).listing(None, SHOWN)
    except FarmError as error:
        return BatchesView(f"**Batches unavailable**: {error.message}", batches_frame([]))
    batches: list[dict[str, Any]] = listing["data"]
    return BatchesView(note(len(batches), listing["has_more"]), batches_frame(batches))


def note(shown: int, more: bool) -> str:
    if not shown:
        return ("No batch yet. Batches made through the HTTP Batch API (`POST /v1/batches`, see the README's "
                "\"Batch jobs over HTTP\") are listed here.")
    newest = f"the newest {shown}" if more else f"{shown} batch{'es' if shown != 1 else ''}"
    return (f"Batches made through the HTTP Batch API: {newest}, newest first. A batch's id is its job's: "
            "type it as the job id above to follow it.")


def batches_frame(batches: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per batch object: id, status, its ``request_counts``, when it was made, its files."""
    rows = [[b["id"], b["status"], requests(b["request_counts"]),
             time.strftime(CREATED_FORMAT, time.localtime(b["created_at"])), b["output_file_id"] or "",
             b["error_file_id"] or ""] for b in batches]
    return pd.DataFrame(rows, columns=BATCH_COLUMNS)


def requests(counts: dict[str, int]) -> str:
    """A batch's ``request_counts`` in one cell: ``2/3 completed, 1 failed``."""
    return f"{counts['completed']}/{counts['total']} completed, {counts['failed']} failed"
