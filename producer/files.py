"""Prompt files for bulk jobs: JSONL, CSV or plain text, read lazily, errors named by line.

- JSONL (``.jsonl``, ``.ndjson``, ``.json``): one JSON object per line with ``prompt`` or
  ``messages`` and optional per-row parameters (``max_new_tokens``, ``temperature`` ...), or a
  bare JSON string (the prompt). Unknown keys are errors.
- CSV (``.csv``, ``.tsv``): a header row; the prompt column (``prompt`` unless told otherwise)
  and optional parameter columns; other columns (ids, notes) are ignored, empty cells left out.
- Text (anything else): one prompt per line.
Blank lines are skipped in every format.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import RequestError
from protocol.schema import NAMED_CHECKS, GenerationRequest, GenerationResult, Limits

from producer.jobs.fingerprint import Fingerprint

FORMATS = ("auto", "jsonl", "csv", "text")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "csv"}
INT_FIELDS = ("max_new_tokens", "top_k", "seed")
FLOAT_FIELDS = ("temperature", "top_p")
TEXT_FIELDS = ("adapter", "stop", "model")
BOOL_FIELDS = ("ignore_eos",)
CSV_PARAMS = INT_FIELDS + FLOAT_FIELDS + TEXT_FIELDS + BOOL_FIELDS


class PromptFileError(ValueError):
    """A prompt file cannot be read, or one of its rows is invalid; ``str()`` is one line."""

    def __init__(self, path: Path, message: str, line: int | None = None) -> None:
        where = f"{path} line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.message = path, line, message


@dataclass(frozen=True)
class Row:
    """One prompt row: its line in the file and its request fields (before job parameters)."""

    line: int
    data: dict[str, Any]


@dataclass(frozen=True)
class FileSummary:
    rows: int
    fingerprint: str
    """sha256 of the rows' content, to recognise the same job when a command is rerun."""
    named: tuple[tuple[str, Any, int], ...] = ()
    """``(field, value, line)``: each resource the rows name (``NAMED_CHECKS``: adapters), with
    the first line naming it; checked by ``check_named`` against what the workers offer."""


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    return _SUFFIXES.get(path.suffix.lower(), "text")


def iter_rows(path: Path, fmt: str = "auto", column: str = "prompt") -> Iterator[Row]:
    """The rows of ``path`` in order; raises ``PromptFileError`` naming the line of a bad one."""
    kind = detect_format(path, fmt)
    try:
        with open(path, "rb") as handle:
            lines = _decoded(path, handle)
            if kind == "csv":
                yield from _csv_rows(path, lines, column)
                return
            parse = _jsonl_row if kind == "jsonl" else _text_row
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield Row(number, parse(path, number, line))
    except OSError as error:
        raise PromptFileError(path, f"cannot read: {error.strerror or error}") from None


def _decoded(path: Path, handle: Any) -> Iterator[str]:
    # Decoded line by line so that a bad byte is reported with its line number.
    for number, raw in enumerate(handle, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise PromptFileError(path, f"not valid UTF-8 text ({error.reason})", number) from None
        yield text.removeprefix("\ufeff") if number == 1 else text


def check_rows(path: Path, params: dict[str, Any], limits: Limits, fmt: str = "auto",
               column: str = "prompt") -> FileSummary:
    """Read every row and validate it with the job parameters, before anything is enqueued.
    Resources named by rows are checked against ``limits`` here when it knows them, and listed
    in the summary for ``check_named`` (a farm reached after the file was read)."""
    fingerprint = Fingerprint(params)
    named: dict[tuple[str, Any], int] = {}
    count = 0
    for row in iter_rows(path, fmt, column):
        with _at_line(path, row.line):
            GenerationRequest.from_dict({**params, **row.data}, limits)
        for name in NAMED_CHECKS.keys() & row.data.keys():
            named.setdefault((name, row.data[name]), row.line)  # hashable: from_dict checked it
        fingerprint.add(row.data)
        count += 1
    if count == 0:
        raise PromptFileError(path, "has no prompts")
    return FileSummary(count, fingerprint.hexdigest(), tuple((n, v, line) for (n, v), line in named.items()))


def check_named(path: Path, summary: FileSummary, limits: Limits) -> None:
    """Refuse a resource (an adapter) named by a row that no online worker offers, with the line
    of the first row naming it, as ``check_rows`` refuses any other field."""
    for name, value, line in sorted(summary.named, key=lambda entry: entry[2]):
        with _at_line(path, line):
            NAMED_CHECKS[name]({name: value}, limits)


@contextmanager
def _at_line(path: Path, line: int) -> Iterator[None]:
    try:
        yield
    except RequestError as error:
        raise PromptFileError(path, error.message, line) from None


def _jsonl_row(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise PromptFileError(path, f"not valid JSON ({error.msg} at column {error.pos + 1})", number) from None
    if isinstance(value, str):
        return {"prompt": value}
    if not isinstance(value, dict):
        raise PromptFileError(path, f"must be a JSON object or string, got {type(value).__name__}", number)
    return value


def _text_row(path: Path, number: int, line: str) -> dict[str, Any]:
    return {"prompt": line.rstrip("\r\n")}


def _csv_rows(path: Path, lines: Iterator[str], column: str) -> Iterator[Row]:
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    reader = csv.DictReader(lines, dialect=dialect)
    if reader.fieldnames is None:
        return
    if column not in reader.fieldnames:
        raise PromptFileError(path, f"no {column!r} column in the header ({', '.join(reader.fieldnames)})", 1)
    try:
        for record in reader:
            if any((value or "").strip() for value in record.values()):
                yield Row(reader.line_num, _csv_row(path, reader.line_num, record, column))
    except csv.Error as error:
        raise PromptFileError(path, f"not valid CSV ({error})", reader.line_num) from None


def _csv_row(path: Path, number: int, record: dict[str, Any], column: str) -> dict[str, Any]:
    data: dict[str, Any] = {"prompt": record.get(column) or ""}
    for name in CSV_PARAMS:
        raw = record.get(name)
        if name != column and isinstance(raw, str) and raw.strip():
            data[name] = _csv_value(path, number, name, raw.strip())
    return data


def _csv_value(path: Path, number: int, name: str, raw: str) -> Any:
    try:
        if name in INT_FIELDS:
            return int(raw)
        if name in FLOAT_FIELDS:
            return float(raw)
    except ValueError:
        kind = "an integer" if name in INT_FIELDS else "a number"
        raise PromptFileError(path, f"{name}: must be {kind}, got {raw!r}", number) from None
    if name in BOOL_FIELDS:
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise PromptFileError(path, f"{name}: must be true or false, got {raw!r}", number)
        return raw.lower() in ("true", "1", "yes")
    return raw


# --- result files (``farm submit -o``) ----------------------------------------------------------
class ResultFileError(ValueError):
    """An output file that ``farm submit`` cannot resume; ``str()`` is one line."""


@dataclass(frozen=True)
class Written:
    """What an output file already holds: rows ``0 .. rows-1``, one complete line each."""

    rows: int = 0
    job_id: str | None = None
    failed: int = 0
    """Rows among them that did not finish ``length`` or ``stop``."""
    size: int = 0
    """Bytes of the complete lines; anything after is a line torn by a killed producer."""


def scan_results(path: Path) -> Written:
    """Read an output file to resume it; a torn last line is left out (``size`` stops before it)."""
    if not path.exists():
        return Written()
    rows = failed = size = 0
    job_id: str | None = None
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.endswith(b"\n"):
                    break
                record = _result_line(path, number, raw, rows)
                job_id = _same_job(path, number, job_id, record.get("job_id"))
                failed += record.get("finish_reason") not in ("length", "stop")
                rows, size = rows + 1, size + len(raw)
    except OSError as error:
        raise ResultFileError(f"{path}: cannot read: {error.strerror or error}") from None
    return Written(rows, job_id, failed, size)


def _result_line(path: Path, number: int, raw: bytes, expected: int) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "index" not in record:
        raise ResultFileError(f"{path} line {number}: not a result line of farm submit; "
                              "pass another output file (-o)")
    if record["index"] != expected:
        raise ResultFileError(f"{path} line {number}: holds row {record['index']}, expected row {expected}; "
                              "pass another output file (-o)")
    return record


def _same_job(path: Path, number: int, job_id: str | None, found: Any) -> str | None:
    if job_id is not None and found != job_id:
        raise ResultFileError(f"{path} line {number}: result of job {found}, earlier lines of job {job_id}")
    return job_id if job_id is not None else str(found) if found is not None else None


def choose_job_id(given: str | None, written: Written, fingerprint: str, output: Path) -> str:
    """The job to run: given, else the one whose results ``output`` holds, else one named after
    the prompts and parameters (so rerunning the same command resumes the same job)."""
    if given and written.job_id and given != written.job_id:
        raise ResultFileError(f"{output} holds results of job {written.job_id}, not {given}; "
                              "pass another output file (-o)")
    return given or written.job_id or f"j{fingerprint[:20]}"


def result_line(job_id: str, index: int, result: GenerationResult) -> str:
    """One line of a results file: the row's index and job, then the result's fields."""
    return json.dumps({"index": index, "job_id": job_id, **result.to_dict()}, ensure_ascii=False) + "\n"
