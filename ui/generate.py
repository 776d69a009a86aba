"""The Generate tab's logic: check, enqueue, then follow one request to its end.

No Gradio here: callbacks in ``ui.app`` wrap these generators, so the logic is tested with a
plain ``FarmClient``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from producer.client import READY_STATES, FarmClient, RequestHandle
from protocol.errors import ErrorCode, FarmError
from protocol.names import INTERACTIVE_QUEUE
from protocol.schema import GenerationRequest, Limits
from ui import status

POLL_MS = 500
"""How long one wait on a request's stream blocks before the queue position is refreshed."""
RESULT_TIMEOUT = 60.0
"""The stored result follows the stream's end event by milliseconds; this only bounds a bug."""
CANCEL_WAIT = 10.0
"""A running request stops at its next token; longer than this means its worker is gone."""
DEFAULT_ADAPTER_CHOICE = "(farm default)"


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
    """The validated request, or a ``FarmError`` whose message says why it cannot be sent."""
    settings = client.settings
    GenerationRequest.from_dict(data, Limits.from_settings(settings))  # prompt first, no Redis needed
    workers = [w for w in client.heartbeats() if w.ready]
    if not workers:
        raise FarmError(ErrorCode.NO_WORKER, status.no_worker())
    depth = client.queue_depths()[INTERACTIVE_QUEUE]
    if depth >= settings.ui_max_queue:
        raise FarmError(ErrorCode.QUEUE_FULL, status.queue_full(depth, settings.ui_max_queue))
    adapters = sorted({a for w in workers for a in w.adapters})
    return GenerationRequest.from_dict(data, Limits.from_settings(settings, adapters or None))


def generate(client: FarmClient, data: dict[str, Any]) -> Iterator[Update]:
    """Enqueue, then stream status and text until the request ends. Raises ``FarmError`` when
    refused. Closing the generator early (the person left or pressed Cancel) cancels the request,
    so that nobody's abandoned request keeps a batch slot."""
    handle = client.send(preflight(client, data))
    finished = False
    try:
        yield from follow(client, handle)
        finished = True
    finally:
        if not finished:
            _cancel_quietly(client, handle.id)


def follow(client: FarmClient, handle: RequestHandle) -> Iterator[Update]:
    """Queued (with the depth ahead), running (worker, batch size) with the text so far, then the
    final line; a step at every stream event, and every ``POLL_MS`` while nothing happens."""
    text, after, line, ended = "", "0", _queued_line(client), False
    worker: str | None = None
    yield Update(line, text, handle.id)
    while not ended:
        events = client.read_events(handle.id, after, block_ms=POLL_MS)
        for event_id, event in events:
            after = event_id
            if event["type"] == "start":  # a run (re)starts from scratch: after a lost worker, an OOM split
                worker, text = event.get("worker"), ""
                line = status.running(worker, event.get("batch_size"))
            elif event["type"] == "delta":
                text += str(event.get("text", ""))
            ended = ended or event["type"] == "end"
        if not events:
            if client.task_meta(handle.id).get("status") in READY_STATES:
                break  # refused by the worker before it reached a batch: no stream at all
            line = _queued_line(client) if after == "0" else _silent_line(client, worker, line)
        yield Update(line, text, handle.id)
    result = handle.result(timeout=RESULT_TIMEOUT)
    yield Update(status.finished(result), result.text or text, handle.id, final=True)


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


def _queued_line(client: FarmClient) -> str:
    workers = client.heartbeats()
    held = sum(w.waiting for w in workers)
    # Until it starts, this request is itself one of those counted: in Redis or held by a worker.
    ahead = max(0, client.queue_depths()[INTERACTIVE_QUEUE] + held - 1)
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
