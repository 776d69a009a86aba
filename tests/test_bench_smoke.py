"""The benchmark runs end to end on the tiny model and writes its files (no timing assertions:
a benchmark is not a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import OUTPUT, ROOT

pytestmark = pytest.mark.integration


def test_farm_bench_runs_every_mode_and_writes_files(tiny_model: Path) -> None:
    out = OUTPUT / "bench-smoke"
    cmd = [sys.executable, "-m", "ops.cli", "bench", "--model", str(tiny_model), "--concurrency", "1,2",
           "--requests", "2", "--new-tokens", "4", "--mixed", "2", "--mixed-requests", "2",
           "--short-tokens", "2", "--long-tokens", "6", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "bench.png").stat().st_size > 0
    record = json.loads((out / "bench.json").read_text())
    rows = {(r["mode"], r["concurrency"]): r for r in record["results"]}
    modes = ["gradio-concurrency", "static-batch", "transformers-serve", "farm-dynamic", "farm-continuous"]
    assert set(rows) == {("sequential", 1)} | {(m, c) for m in modes for c in (1, 2)}
    for key, row in rows.items():
        assert "unavailable" not in row, (key, row)
        assert row["errors"] == 0 and row["tokens"] == 2 * 4, (key, row)
        assert row["identical_all"], (key, row)
    assert [r["mode"] for r in record["mixed"]] == ["farm-dynamic", "farm-continuous"]
    assert all(r["identical_all"] for r in record["mixed"])
    assert "| farm-continuous | 2 |" in done.stdout
    assert {t["target"].split(" ")[0] for t in record["targets"]} >= {"farm", "short-request", "greedy"}
