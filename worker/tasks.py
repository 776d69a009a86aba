"""The ``batchfarm.generate`` task: validate, hand to the engine, wait, return the result."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery import Celery, Task

from protocol.errors import FarmError, RequestError
from protocol.names import GENERATE_TASK, queue_priority
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
        if stored is not None:  # a redelivery of a finished request does not run again
            return stored
        req = GenerationRequest.from_dict(request, limits() if callable(limits) else limits)
        meta = meta if isinstance(meta, dict) else {}
        result = engine.submit(task_id, req, _submitted_at(meta), _priority(self)).result()
        if result.finish_reason == "error" and result.error:
            raise _error_type(result.error["code"])(result.error["code"], result.error["message"])
        return {**result.to_dict(), "model": model}

    return generate


def _stored_result(app: Celery, task_id: str) -> dict[str, Any] | None:
    meta = app.backend.get_task_meta(task_id)
    if meta.get("status") == "SUCCESS" and isinstance(meta.get("result"), dict):
        return dict(meta["result"])
    return None


def _submitted_at(meta: dict[str, Any]) -> float:
    value = meta.get("submitted_at")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else time.time()


def _priority(task: Task) -> int:
    routing = (task.request.delivery_info or {}).get("routing_key", "")
    return queue_priority(str(routing))


def _error_type(code: str) -> type[FarmError]:
    return RequestError if code in {"invalid_request", "prompt_too_long", "unknown_adapter",
                                        "unknown_model"} else FarmError
