"""A job's fingerprint: what makes a resubmission with the same job id the same job.

``Job.submit`` stores it with a new job and refuses a resubmission whose fingerprint differs
(other prompts would silently get the old prompts' results); ``farm submit`` and the UI compute
it while they check a prompt file, so that the file is read once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any


class Fingerprint:
    """sha256 of a job's parameters and its rows in order. A row given as a string counts as
    ``{"prompt": row}``, as a line of a text prompt file does."""

    def __init__(self, params: dict[str, Any]) -> None:
        self._digest = hashlib.sha256(canonical(params).encode())

    def add(self, row: Any) -> None:
        data = {"prompt": row} if isinstance(row, str) else row
        self._digest.update(canonical(data).encode() + b"\n")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def fingerprint_of(rows: Iterable[Any], params: dict[str, Any]) -> str:
    fingerprint = Fingerprint(params)
    for row in rows:
        fingerprint.add(row)
    return fingerprint.hexdigest()


def canonical(value: Any) -> str:
    # default=str: a row that is not JSON (refused when sent) still has a fingerprint.
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
