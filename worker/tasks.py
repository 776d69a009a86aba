"""The ``batchfarm.generate`` task: validate, hand to the engine, wait, return the result.

A finished request returns its result (Celery stores ``SUCCESS``), a failed one raises (``FAILURE``)
and a cancelled one is stored as ``REVOKED`` with its result so far (``protocol/results.py``) and
announced with a ``task-revoked`` event, so that Flower lists it as revoked, not as a success.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery import Celery, Task, states
from celery.exceptions import Ignore

from protocol.errors import FarmError, RequestError
from protocol.names import GENERATE_TASK, queue_priority
from protocol.results import FINAL_STATES, cancelled_error, result_of_revoked
from protocol.schema import GenerationRequest, Limits
from worker.engine import Engine


def register_generate(app: Celery, engine: Engine, limits: Limits | Callable[[], Limits],
                      on_redelivered: Callable[[str], None] | None = None, model: str = "") -> Task:
    """Bind the task to this process's engine (one engine per worker process); ``limits`` may be
    a function, read per request (adapters can be loaded while the worker runs);
    ``on_redelivered`` hears of messages that came back (a worker died holding them); ``model``
    is the public name of the model served, which each result carries."""

    @app.task(name=GENERATE_TASK, bind=True, throws=(FarmError,))
    def generate(self: Task, request: Any = None, meta: Any = None) -> dict[str, Any]:
        task_id = str(self.request.id)
        if on_redelivered is not None and (self.request.delivery_info or {}).get("redelivered"):
            on_redelivered(task_id)
        stored = _stored_result(app, task_id)
        if stored is not None:  # a redelivery of a finished or cancelled request does not run again
            return _ended(self, stored)
        req = GenerationRequest.from_dict(request, limits() if callable(limits) else limits)
        meta = meta if isinstance(meta, dict) else {}
        result = engine.submit(task_id, req, _submitted_at(meta), _priority(self)).result()
        if result.finish_reason == "error" and result.error:
            raise _error_type(result.error["code"])(result.error["code"], result.error["message"])
        return _ended(self, {**result.to_dict(), "model": model})

    return generate


def _ended(task: Task, result: dict[str, Any]) -> dict[str, Any]:
    """The task's return value, unless the request was cancelled: that is stored as ``REVOKED``
    (with its result so far) and announced as Celery's worker announces a revoke, then ``Ignore``
    keeps Celery from storing ``SUCCESS`` over it (the message is still acknowledged)."""
    if result.get("finish_reason") != "cancelled":
        return result
    task.backend.store_result(task.request.id, cancelled_error(result), states.REVOKED, request=task.request)
    task.send_event("task-revoked", terminated=False, signum=None, expired=False)
    raise Ignore()


def _stored_result(app: Celery, task_id: str) -> dict[str, Any] | None:
    """The result stored for good (finished or cancelled), if any."""
    meta = app.backend.get_task_meta(task_id)
    status, value = meta.get("status"), meta.get("result")
    if status not in FINAL_STATES:
        return None
    if status == states.SUCCESS:
        return dict(value) if isinstance(value, dict) else None
    return result_of_revoked(value) or {"id": task_id, "finish_reason": "cancelled"}


def _submitted_at(meta: dict[str, Any]) -> float:
    value = meta.get("submitted_at")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else time.time()


def _priority(task: Task) -> int:
    routing = (task.request.delivery_info or {}).get("routing_key", "")
    return queue_priority(str(routing))


def _error_type(code: str) -> type[FarmError]:
    return RequestError if code in {"invalid_request", "prompt_too_long", "unknown_adapter",
                                        "unknown_model"} else FarmError
