"""``farm status`` against a real worker: it fits the terminal, and ``--wide`` shows every column."""

from __future__ import annotations

import os
import subprocess
import sys

from ops.status import COLUMNS
from tests.conftest import ROOT, WorkerProcess

VERTICAL = "│┃"


def farm_status(worker: WorkerProcess, columns: int, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update({"PYTHONPATH": str(ROOT), "FARM_REDIS_URL": worker.redis_url, "COLUMNS": str(columns)})
    out = subprocess.run([sys.executable, "-m", "ops.cli", "status", *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def cells(screen: str) -> list[str]:
    """The text of every table cell (header and body) on ``screen``; a line whose first cell is
    empty continues the row above (a long cell wrapped), so only its non-empty cells count."""
    found = []
    for line in screen.splitlines():
        if line[:1] in VERTICAL:
            row = [cell.strip() for cell in line.strip(VERTICAL).replace("┃", "│").split("│")]
            found += row if row[0] else [cell for cell in row if cell]
    return found


def test_status_fits_80_and_120_columns_with_nothing_cut(farm_worker: WorkerProcess) -> None:
    for width in (80, 120):
        screen = farm_status(farm_worker, width)
        assert max(len(line) for line in screen.splitlines()) <= width, screen
        assert "…" not in screen and all(cells(screen)), screen
        for part in ("Workers online", farm_worker.name, "ready", "requests", "tok/s", "interactive"):
            assert part in screen, (part, screen)
    assert "--wide shows all" in farm_status(farm_worker, 80)


def test_status_wide_shows_every_column_however_narrow_the_terminal(farm_worker: WorkerProcess) -> None:
    screen = farm_status(farm_worker, 80, "--wide")
    header = next(line for line in screen.splitlines() if line.startswith("┃"))
    assert [cell.strip() for cell in header.strip("┃").split("┃")] == list(COLUMNS)
    assert "…" not in screen and "--wide shows all" not in screen
    assert farm_worker.name in screen
