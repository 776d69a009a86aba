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
    cmd = [sys.executable, "-m", "ops.cli", "bench", "--models", str(tiny_model), "--concurrency", "1,2",
           "--requests", "2", "--new-tokens", "4", "--mixed", "2", "--mixed-requests", "2",
           "--short-tokens", "2", "--long-tokens", "6", "--shared-prefix", "24", "--profile-step", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    label = tiny_model.name
    assert (out / f"{label}.png").stat().st_size > 0
    record = json.loads((out / f"{label}.json").read_text())
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
    # The machine's bounds, each run's fraction of them, the decode step's profile.
    assert record["bounds"]["weight_bytes"] == 4 * record["params"] and record["machine"]["threads"] >= 1
    assert all(0 < r["of_batch1_bw"] for r in record["results"])
    assert record["step"]["rows"] == 16 and record["step"]["step_ms"] > 0
    assert "mkldnn::_linear_pointwise" in Path(record["step"]["profile_file"]).read_text()
    # The shared-prefix scenario: every prompt behind the same tokens, the farm with and without its cache.
    prefix = record["shared_prefix"]
    assert 0 < prefix["tokens"] <= 24 and prefix["concurrency"] == 2
    assert [r["mode"] for r in prefix["results"]] == ["sequential", "static-batch", "transformers-serve",
                                                      "farm-dynamic", "farm-continuous", "farm-no-prefix-cache"]
    assert all(r["identical_all"] and r["ttft_p50"] is not None for r in prefix["results"]), prefix["results"]
    # Issue 17's targets, PASS/FAIL/N/A per model, in the sweep's summary too.
    sweep = json.loads((out / "sweep.json").read_text())
    assert [m["label"] for m in sweep["models"]] == [label]
    assert {c["status"] for c in record["acceptance"]} <= {"PASS", "FAIL", "N/A", "INFO"}
    assert f"PASS  {label}  greedy outputs identical to sequential" in done.stdout
