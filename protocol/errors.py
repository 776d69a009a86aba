"""Named errors shared by clients and workers, with codes a client can act on."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Why a request failed; stored in ``GenerationResult.error['code']``."""

    INVALID_REQUEST = "invalid_request"
    PROMPT_TOO_LONG = "prompt_too_long"
    UNKNOWN_ADAPTER = "unknown_adapter"
    UNKNOWN_MODEL = "unknown_model"
    GENERATION_FAILED = "generation_failed"
    OUT_OF_MEMORY = "out_of_memory"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    NO_WORKER = "no_worker"
    REDIS_UNREACHABLE = "redis_unreachable"
    QUEUE_FULL = "queue_full"
    INTERNAL = "internal"


class FarmError(Exception):
    """Base of every error the farm raises on purpose. ``args`` stay ``(code, message)`` so that
    Celery's json result backend can rebuild it on the client side."""

    default_code = ErrorCode.INTERNAL

    def __init__(self, code: str | ErrorCode | None = None, message: str = "") -> None:
        code_value = ErrorCode(code).value if code else self.default_code.value
        super().__init__(code_value, message)
        self.code = code_value
        self.message = message

    def __str__(self) -> str:
        return self.message or self.code

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class RequestError(FarmError):
    """A request is invalid; the message names the field and the limit."""

    default_code = ErrorCode.INVALID_REQUEST

    @classmethod
    def for_field(cls, field: str, problem: str, code: ErrorCode | None = None) -> RequestError:
        return cls(code or cls.default_code, f"{field}: {problem}")


class GenerationError(FarmError):
    """The model failed on this request (not its neighbours)."""

    default_code = ErrorCode.GENERATION_FAILED


class FarmUnavailable(FarmError):
    """Redis is unreachable or no worker serves the farm."""

    default_code = ErrorCode.REDIS_UNREACHABLE


class NoWorkerError(FarmUnavailable):
    """No live worker serves the model an interactive request names (an HTTP API's 503): the
    request was not enqueued. Bulk rows are not refused so: they wait in their model's queue."""

    default_code = ErrorCode.NO_WORKER

    @classmethod
    def for_model(cls, model: str, served: list[str]) -> NoWorkerError:
        others = f"; models served now: {', '.join(served)}" if served else "; no worker is online"
        return cls(ErrorCode.NO_WORKER, f"no worker serves model {model}{others}")


class SettingsError(ValueError):
    """A ``FARM_*`` setting is invalid."""
