"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the HTTP
status each SDK maps to its exception class."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from protocol.errors import ErrorCode, FarmError, FarmUnavailable, RequestError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         409: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}
REQUEST_CODES = {ErrorCode.INVALID_REQUEST.value, ErrorCode.PROMPT_TOO_LONG.value,
                 ErrorCode.UNKNOWN_ADAPTER.value}


class ApiError(Exception):
    """An answer other than 200; ``retry_after`` (seconds) becomes a ``Retry-After`` header."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def bad_field(param: str, problem: str, code: str = ErrorCode.INVALID_REQUEST.value) -> ApiError:
    return ApiError(400, f"{param}: {problem}", param, code)


def from_farm(error: FarmError, rename: dict[str, str] | None = None) -> ApiError:
    """A farm error as the API answers it; ``rename`` maps farm field names to the API's."""
    if isinstance(error, RequestError) or error.code in REQUEST_CODES:
        field, sep, problem = error.message.partition(": ")
        if not sep:
            return ApiError(400, error.message, None, error.code)
        param = (rename or {}).get(field, field)
        return ApiError(400, f"{param}: {problem}", param, error.code)
    if isinstance(error, FarmUnavailable) or error.code in (ErrorCode.NO_WORKER.value,
                                                            ErrorCode.REDIS_UNREACHABLE.value):
        return ApiError(503, error.message or error.code, None, error.code, retry_after=5)
    if error.code == ErrorCode.QUEUE_FULL.value:
        return ApiError(429, error.message, None, error.code, retry_after=1)
    return ApiError(500, error.message or error.code, None, error.code)


def from_result_error(error: dict[str, str], rename: dict[str, str] | None = None) -> ApiError:
    """A failed ``GenerationResult.error`` (``{"code", "message"}``) as the API answers it."""
    code = error.get("code", "")
    known = code if code in ErrorCode.__members__.values() else ErrorCode.INTERNAL.value
    return from_farm(FarmError(known, error.get("message", "")), rename)


async def read_json(request: Request) -> Any:
    """The request's body as json, or a 400 saying why not."""
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error})", None, "invalid_json") from None
