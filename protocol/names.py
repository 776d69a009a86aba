"""Names every side agrees on: the task, its queues, and the Redis keys beside Celery's."""

from __future__ import annotations

GENERATE_TASK = "batchfarm.generate"
"""The one task: a single generation request."""

INTERACTIVE_QUEUE = "interactive"
"""Requests a person waits for; served before ``bulk``."""
BULK_QUEUE = "bulk"
"""Rows of bulk jobs."""
QUEUES = (INTERACTIVE_QUEUE, BULK_QUEUE)
"""The kinds of queue, in priority order. Alone, each is the queue of requests that name no
model (a farm of one model, or the workers of ``FARM_DEFAULT_MODEL``); ``kind.<model>`` is the
queue of one model's requests."""
PRIORITY = {INTERACTIVE_QUEUE: 0, BULK_QUEUE: 1}
"""Lower is served first (the engine's order among waiting requests)."""


def model_queue(kind: str, model: str | None) -> str:
    """The queue of ``kind`` for requests of ``model``: ``interactive.demo``; the plain kind when
    no model is named."""
    return f"{kind}.{model}" if model else kind


def model_queues(model: str, plain: bool = False) -> tuple[str, ...]:
    """The queues a worker of ``model`` consumes, in priority order; ``plain`` adds the queues of
    requests that name no model (it serves the farm's default model)."""
    queues: list[str] = []
    for kind in QUEUES:
        queues += [model_queue(kind, model), kind] if plain else [model_queue(kind, model)]
    return tuple(queues)


def queue_kind(queue: str) -> str:
    """``interactive.demo`` -> ``interactive``."""
    return queue.partition(".")[0]


def queue_priority(queue: str) -> int:
    """The engine's priority of a message that came from ``queue`` (interactive first)."""
    return PRIORITY.get(queue_kind(queue), 0)

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


def models_key() -> str:
    """Hash of the models served now or lately: name -> json record (adapters, queues, when last
    seen), refreshed by the workers' heartbeats and expiring ``FARM_RESULT_EXPIRES`` after the last.
    A model whose workers restart is still known, so its bulk rows wait in its queue, while a
    name never served is refused. One hash, read in one round trip (no scan)."""
    return f"{PREFIX}models"


def executions_key() -> str:
    """Counter hash of executions per request id (tests and reliability reports read it)."""
    return f"{PREFIX}executions"


def redeliveries_key() -> str:
    """Counter hash of redelivered messages per request id (with executions counting on)."""
    return f"{PREFIX}redelivered"


def job_key(job_id: str) -> str:
    """Hash describing a bulk job (total rows, params, state)."""
    return f"{PREFIX}job:{job_id}"


class JobKeys:
    """Redis keys of one bulk job, beside Celery's results of its rows ``<job_id>:<i>``:

    - ``info``: hash with ``total`` (-1 until a lazy source runs out), ``params``, ``created``,
      ``state`` (running, finished, cancelled), ``fingerprint`` (optional, of the prompts),
      ``tokens`` (completion tokens of the finished rows), ``last_result`` (when the last finished)
    - ``sent``, ``ok``, ``failed``, ``cancelled``: bitmaps, bit ``i`` is row ``i``
    - ``rows``: index -> request json of the rows in flight or failed (for a retry)
    - ``sending``: set of the rows of the chunk being enqueued right now (a producer killed in the
      middle of a chunk leaves them there for the next one to settle)
    - ``producer``: the lease of the one process that sends the job's rows
    - ``input``: list of the rows (json) of a detached job, read by whichever process pumps it
    """

    def __init__(self, job_id: str) -> None:
        self.info = job_key(job_id)
        self.sent, self.ok, self.failed, self.cancelled, self.rows, self.sending, self.producer = (
            f"{self.info}:{name}" for name in ("sent", "ok", "failed", "cancelled", "rows", "sending", "producer"))
        self.input = f"{self.info}:input"

    def bitmaps(self) -> list[str]:
        """sent, ok, failed, cancelled: the order ``producer.jobs.book_from_bitmaps`` takes them."""
        return [self.sent, self.ok, self.failed, self.cancelled]

    def all(self) -> list[str]:
        """The keys that expire with the job (the lease expires by itself)."""
        return [self.info, *self.bitmaps(), self.rows, self.sending, self.input]


DETACHED_JOBS = f"{PREFIX}jobs:detached"
"""Sorted set of the detached jobs (job id -> time registered): jobs that run with no client
attached, pumped by any process running a ``JobRunner`` (every ``farm api``)."""


# kombu's Redis transport keeps the messages a worker reserved (delivered, not yet acknowledged)
# under these keys; a producer peeks there to tell whether a message made it to the broker.
KOMBU_UNACKED = "unacked"
"""Hash: delivery tag -> json ``[message, exchange, routing_key]``."""
KOMBU_UNACKED_INDEX = "unacked_index"
"""Sorted set: delivery tag -> time reserved (what redelivery after the visibility timeout scans)."""


def owners_key() -> str:
    """Hash: delivery tag of each reserved message -> ``<owner>\\n<queue key>`` (who holds it)."""
    return f"{PREFIX}owners"


def alive_key(owner: str) -> str:
    """Set with a short expiry by a live worker process; its messages are restored once it lapses."""
    return f"{PREFIX}alive:{owner}"


def duplicates_key() -> str:
    """Counter of late results dropped because the request already had a stored result."""
    return f"{PREFIX}duplicates"
