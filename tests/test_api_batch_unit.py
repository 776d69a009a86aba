"""Batch input checks and output lines (pure: no Redis, no HTTP)."""

from __future__ import annotations

import json

from api.batch_input import BatchLine, check_input
from api.batch_keeper import output_record, split_lines
from protocol.errors import ErrorCode, FarmError
from protocol.schema import GenerationResult, Limits

SERVED: dict[str, str | None] = {"tiny": None, "tiny:second": "second"}
URL = "/v1/completions"


def line(custom_id: str, **body: object) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": URL,
                       "body": {"model": "tiny", "prompt": "hi", **body}}).encode()


def test_lines_become_rows_with_the_adapter_of_their_model_and_n_rows_each() -> None:
    content = b"\n".join([line("a"), b"", line("b", model="tiny:second", n=2, max_tokens=5)])
    checked = check_input(content, URL, SERVED, Limits())
    assert checked.errors == []
    assert checked.lines == [BatchLine("a", "tiny", 1, 1), BatchLine("b", "tiny:second", 2, 2)]
    assert [r.get("adapter") for r in checked.rows] == [None, "second", "second"]
    assert checked.rows[1]["max_new_tokens"] == 5


def test_every_bad_line_is_reported_with_its_number_and_field() -> None:
    content = b"\n".join([b"[1, 2]", line("a", temperature="hot"), line("a"), line("a"),
                          line("c", prompt="x" * 16001)])
    errors = check_input(content, URL, SERVED, Limits()).errors
    assert [(e["line"], e["param"], e["code"]) for e in errors] == [
        (1, None, "invalid_json_line"), (2, "body.temperature", "invalid_request"),
        (4, "custom_id", "duplicate_custom_id"), (5, "body.prompt", "prompt_too_long")]
    assert errors[1]["message"] == "line 2: body.temperature: must be a number, got str"


def test_output_records_in_openai_shape() -> None:
    ok = GenerationResult(id="j:0", text="yes", prompt_tokens=3, completion_tokens=1, finish_reason="stop")
    failed = GenerationResult.failed("j:1", FarmError(ErrorCode.PROMPT_TOO_LONG, "prompt: too long"))
    cancelled = GenerationResult(id="j:2", finish_reason="cancelled")
    lines = [BatchLine(c, "tiny", 1, 1) for c in ("a", "b", "c")]
    outputs, errors = split_lines(lines, iter([ok, failed, cancelled]), URL, "expired")
    answered = json.loads(outputs[0])
    assert answered["response"]["body"]["choices"][0]["text"] == "yes" and answered["error"] is None
    assert answered["response"]["request_id"] == "j:0" and answered["id"].startswith("batch_req_")
    refused, late = (json.loads(e) for e in errors)
    assert refused["response"]["status_code"] == 400 and refused["error"]["code"] == "prompt_too_long"
    assert late["response"] is None and late["error"]["code"] == "batch_expired"
    assert output_record(lines[2], [cancelled], False, "cancelled")["error"]["code"] == "batch_cancelled"
