"""A batch input file checked line by line, as OpenAI's rules and the online endpoints' own
validation say (pure: the served models and limits are given).

Every line is ``{"custom_id", "method": "POST", "url", "body"}`` with the batch's endpoint as
``url``, a unique ``custom_id`` and a body the endpoint would take (``api.translate`` and
``api.service.farm_requests``, so limits match), without ``stream: true``. Every bad line is
reported with its 1-based number and field; a file with any is refused as a whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from api.errors import ApiError
from api.service import farm_requests
from api.translate import ApiCall, chat_call, completion_call
from protocol.schema import Limits

ENDPOINTS = {"/v1/chat/completions": chat_call, "/v1/completions": completion_call}
LINE_KEYS = ("custom_id", "method", "url", "body")
MAX_ERRORS = 1000
"""Most line errors kept in a failed batch's ``errors`` (a file of garbage would repeat one)."""
MAX_CUSTOM_ID = 512


@dataclass(frozen=True)
class BatchLine:
    """One request of a batch: its farm rows are ``count`` consecutive rows of the job."""

    custom_id: str
    model: str
    n: int
    count: int

    def to_json(self) -> list[Any]:
        return [self.custom_id, self.model, self.n, self.count]

    @classmethod
    def from_json(cls, data: list[Any]) -> BatchLine:
        return cls(str(data[0]), str(data[1]), int(data[2]), int(data[3]))


@dataclass
class CheckedInput:
    lines: list[BatchLine]
    rows: list[dict[str, Any]]
    """The farm requests of every line, in order (the job's rows)."""
    errors: list[dict[str, Any]]


def check_input(content: bytes, endpoint: str, served: dict[str, str | None], limits: Limits) -> CheckedInput:
    out = CheckedInput([], [], [])
    seen: set[str] = set()
    parse = ENDPOINTS[endpoint]
    for number, raw in enumerate(content.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line, rows = _check_line(raw, number, endpoint, parse, served, limits, seen)
        except LineError as error:
            if len(out.errors) < MAX_ERRORS:
                out.errors.append(error.as_dict())
            continue
        out.lines.append(line)
        out.rows.extend(rows)
    return out


class LineError(Exception):
    def __init__(self, line: int, code: str, message: str, param: str | None) -> None:
        super().__init__(message)
        self.line, self.code, self.message, self.param = line, code, message, param

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": f"line {self.line}: {self.message}", "param": self.param,
                "line": self.line}


def _check_line(raw: bytes, number: int, endpoint: str, parse: Any, served: dict[str, str | None],
                limits: Limits, seen: set[str]) -> tuple[BatchLine, list[dict[str, Any]]]:
    data = _json_line(raw, number)
    custom_id = _custom_id(data, number, seen)
    if data.get("method") != "POST":
        raise LineError(number, "invalid_method", f"method: must be 'POST', got {data.get('method')!r}", "method")
    if data.get("url") != endpoint:
        raise LineError(number, "mismatched_url", f"url: must be the batch's endpoint {endpoint!r} on every "
                        f"line, got {data.get('url')!r}", "url")
    body = data.get("body")
    if isinstance(body, dict) and body.get("stream") is True:
        raise LineError(number, "invalid_request", "body.stream: streaming is not available in a batch",
                        "body.stream")
    try:
        call: ApiCall = parse(body)
        requests = farm_requests(call, served, limits)
    except ApiError as error:
        param = f"body.{error.param}" if error.param else "body"
        problem = error.message.removeprefix(f"{error.param}: ") if error.param else error.message
        raise LineError(number, error.code or "invalid_request", f"{param}: {problem}", param) from None
    seen.add(custom_id)
    return BatchLine(custom_id, call.model, call.n, len(requests)), [r.to_dict() for r in requests]


def _json_line(raw: bytes, number: int) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LineError(number, "invalid_json_line", f"is not valid JSON ({error})", None) from None
    if not isinstance(data, dict):
        raise LineError(number, "invalid_json_line", "must be a JSON object", None)
    unknown = sorted(set(data) - set(LINE_KEYS))
    if unknown:
        raise LineError(number, "invalid_request", f"{unknown[0]}: unknown field (a line has "
                        f"{', '.join(LINE_KEYS)})", unknown[0])
    return data


def _custom_id(data: dict[str, Any], number: int, seen: set[str]) -> str:
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
        raise LineError(number, "invalid_custom_id", f"custom_id: must be a string of 1 to {MAX_CUSTOM_ID} "
                        "characters", "custom_id")
    if custom_id in seen:
        raise LineError(number, "duplicate_custom_id", f"custom_id: {custom_id!r} is on an earlier line too; "
                        "each line needs its own", "custom_id")
    return custom_id
