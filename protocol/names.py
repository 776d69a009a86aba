"""Names every side agrees on: the task, its queues, and the Redis keys beside Celery's."""

from __future__ import annotations

GENERATE_TASK = "batchfarm.generate"
"""The one task: a single generation request."""

INTERACTIVE_QUEUE = "interactive"
"""Requests a person waits for; served before ``bulk``."""
BULK_QUEUE = "bulk"
"""Rows of bulk jobs."""
QUEUES = (INTERACTIVE_QUEUE, BULK_QUEUE)
PRIORITY = {INTERACTIVE_QUEUE: 0, BULK_QUEUE: 1}
"""Lower is served first (the engine's order among waiting requests)."""

PREFIX = "farm:"


def stream_key(request_id: str) -> str:
    """Redis stream of one request's events: start, text deltas, end."""
    return f"{PREFIX}stream:{request_id}"


def cancel_key(request_id: str) -> str:
    """Set when a client cancels a request; the worker stops it at the next step."""
    return f"{PREFIX}cancel:{request_id}"


def submitted_key(request_id: str) -> str:
    """The client's own record of a submitted request (Celery reads unknown ids as PENDING)."""
    return f"{PREFIX}submitted:{request_id}"


def heartbeat_key(worker: str) -> str:
    """A worker's heartbeat record (json), expiring when the worker stops beating."""
    return f"{PREFIX}worker:{worker}"


HEARTBEAT_PATTERN = f"{PREFIX}worker:*"


def executions_key() -> str:
    """Counter hash of executions per request id (tests and reliability reports read it)."""
    return f"{PREFIX}executions"


def redeliveries_key() -> str:
    """Counter hash of redelivered messages per request id (with executions counting on)."""
    return f"{PREFIX}redelivered"


def job_key(job_id: str) -> str:
    """Hash describing a bulk job (total rows, params, state)."""
    return f"{PREFIX}job:{job_id}"


def owners_key() -> str:
    """Hash: delivery tag of each reserved message -> ``<owner>\\n<queue key>`` (who holds it)."""
    return f"{PREFIX}owners"


def alive_key(owner: str) -> str:
    """Set with a short expiry by a live worker process; its messages are restored once it lapses."""
    return f"{PREFIX}alive:{owner}"


def duplicates_key() -> str:
    """Counter of late results dropped because the request already had a stored result."""
    return f"{PREFIX}duplicates"
