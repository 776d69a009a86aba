"""``farm test``: lint, type-check the light packages, then run the test suite."""

from __future__ import annotations

import subprocess
import sys

from protocol.settings import project_root

LINT = [sys.executable, "-m", "ruff", "check", "."]
TYPES = [sys.executable, "-m", "mypy", "protocol", "producer", "api"]
PYTEST = [sys.executable, "-m", "pytest", "tests"]


def main(argv: list[str] | None = None) -> int:
    args = list(argv or [])
    for step in (LINT, TYPES):
        print("farm test:", " ".join(step[2:]), flush=True)
        if subprocess.call(step, cwd=project_root()) != 0:
            return 1
    print("farm test: pytest", " ".join(args), flush=True)
    return subprocess.call([*PYTEST, *args], cwd=project_root())
