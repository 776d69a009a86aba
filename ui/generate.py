"""The Generate tab's logic: check, enqueue, then follow one request to its end.

No Gradio here: callbacks in ``ui.app`` wrap these generators, so the logic is tested with a
plain ``FarmClient``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from producer.client import FarmClient, RequestHandle
from producer.follow import Follower
from protocol.errors import ErrorCode, FarmError
from protocol.names import INTERACTIVE_QUEUE
from protocol.schema import GenerationRequest, Limits
from ui import status
from ui.models import DEFAULT_ADAPTER_CHOICE, interactive_queues

POLL_MS = 500
"""How long one wait on a request's stream blocks before the queue position is refreshed."""
RESULT_TIMEOUT = 60.0
"""The stored result follows the stream's end event by milliseconds; this only bounds a bug."""
CANCEL_WAIT = 10.0
"""A running request stops at its next token; longer than this means its worker is gone."""
__all__ = ["DEFAULT_ADAPTER_CHOICE", "Update", "cancel", "follow", "generate", "preflight", "request_data"]


@dataclass(frozen=True)
class Update:
    """What the Generate tab shows after each step."""

    status: str
    text: str
    request_id: str
    final: bool = False


def request_data(prompt: str, chat: bool, params: dict[str, Any]) -> dict[str, Any]:
    """The request as a dict for ``GenerationRequest.from_dict``, from the tab's widgets."""
    data = {k: v for k, v in params.items() if v is not None and v != ""}
    if data.get("adapter") == DEFAULT_ADAPTER_CHOICE:
        del data["adapter"]
    if "max_new_tokens" in data:
        data["max_new_tokens"] = int(data["max_new_tokens"])
    if "seed" in data:
        data["seed"] = int(data["seed"])
        if data["seed"] < 0:  # the widget's "random"
            del data["seed"]
    if chat:
        return {**data, "messages": [{"role": "user", "content": prompt or ""}]}
    return {**data, "prompt": prompt or ""}


def preflight(client: FarmClient, data: dict[str, Any]) -> GenerationRequest:
    """The validated request, or a ``FarmError`` whose message says why it cannot be sent: no
    worker (for its model), or its model's interactive queue full."""
    settings = client.settings
    GenerationRequest.from_dict(data, Limits.from_settings(settings))  # prompt first, no Redis needed
    catalog = client.catalog()
    if not any(w.ready for w in catalog.beats):
        raise FarmError(ErrorCode.NO_WORKER, status.no_worker())
    request = GenerationRequest.from_dict(data, catalog.limits(settings))
    catalog.check_served(request, INTERACTIVE_QUEUE)
    depth = waiting(client, request.model)
    if depth >= settings.ui_max_queue:
        raise FarmError(ErrorCode.QUEUE_FULL, status.queue_full(depth, settings.ui_max_queue))
    return request


def waiting(client: FarmClient, model: str | None) -> int:
    """Requests waiting in Redis ahead of a new interactive one for ``model``."""
    depths = client.queue_depths()
    return sum(depths.get(q, 0) for q in interactive_queues(client.models(), model))


def generate(client: FarmClient, data: dict[str, Any]) -> Iterator[Update]:
    """Enqueue, then stream status and text until the request ends. Raises ``FarmError`` when
    refused. Closing the generator early (the person left or pressed Cancel) cancels the request,
    so that nobody's abandoned request keeps a batch slot."""
    request = preflight(client, data)
    handle = client.send(request)
    finished = False
    try:
        yield from follow(client, handle, request.model)
        finished = True
    finally:
        if not finished:
            _cancel_quietly(client, handle.id)


def follow(client: FarmClient, handle: RequestHandle, model: str | None = None) -> Iterator[Update]:
    """Queued (with the depth ahead), running (worker, batch size) with the text so far, then the
    final line; a step at every stream event, and every ``POLL_MS`` while nothing happens."""
    follower = Follower()
    line = _queued_line(client, model)
    yield Update(line, follower.text, handle.id)
    # Ends at the stream's end, or when the worker refused it before it reached a batch (no stream).
    for events in handle.follow(follower, block_ms=POLL_MS):
        if any(e["type"] == "start" for e in events):  # a run (re)starts: after a lost worker, an OOM split
            line = status.running(follower.worker, follower.batch_size)
        elif not events:
            line = _silent_line(client, follower.worker, line) if follower.started else _queued_line(client, model)
        yield Update(line, follower.text, handle.id)
    result = handle.result(timeout=RESULT_TIMEOUT)
    yield Update(status.finished(result), result.text or follower.text, handle.id, final=True)


def cancel(client: FarmClient, request_id: str) -> Update:
    """Cancel from the Cancel button: a queued request never runs, a running one stops at its
    next token (its partial text is kept)."""
    if not request_id:
        return Update("Nothing to cancel: no request yet.", "", "", final=True)
    handle = client.handle(request_id)
    state = handle.status()
    if state.state in ("done", "failed", "cancelled"):
        return Update(status.finished(handle.result(timeout=RESULT_TIMEOUT)), state.text, request_id, True)
    handle.cancel()
    if state.state != "running":
        return Update(status.cancelled_while_queued(), "", request_id, final=True)
    try:
        result = handle.result(timeout=CANCEL_WAIT)
    except TimeoutError:  # its worker is gone or stuck: the flag stops it wherever it runs next
        return Update(status.cancel_pending(), state.text, request_id, final=True)
    return Update(status.finished(result), result.text, request_id, final=True)


def _queued_line(client: FarmClient, model: str | None) -> str:
    workers = [w for w in client.heartbeats() if model is None or w.model_name == model]
    held = sum(w.waiting for w in workers)
    # Until it starts, this request is itself one of those counted: in Redis or held by a worker.
    ahead = max(0, waiting(client, model) + held - 1)
    return status.queued(ahead, len(workers))


def _silent_line(client: FarmClient, worker: str | None, line: str) -> str:
    """While running and nothing arrives: the same line, unless its worker stopped beating."""
    if worker is None or any(w.name == worker for w in client.heartbeats()):
        return line
    return status.worker_lost(worker, client.settings.visibility_timeout)


def _cancel_quietly(client: FarmClient, request_id: str) -> None:
    try:
        client.cancel(request_id)
    except FarmError:  # Redis gone: the request cannot run without it either
        pass
