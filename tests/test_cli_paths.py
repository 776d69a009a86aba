"""The ``farm`` script as a user types it from their own directory: relative paths are theirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import OUTPUT, ROOT, WorkerProcess

pytestmark = pytest.mark.integration


def test_relative_paths_resolve_against_the_users_directory(farm_worker: WorkerProcess) -> None:
    here = OUTPUT / "cli-paths" / "elsewhere"
    here.mkdir(parents=True, exist_ok=True)
    (here / "out.jsonl").unlink(missing_ok=True)
    (here / "rel.jsonl").write_text("".join(json.dumps({"prompt": f"relative {i}"}) + "\n" for i in range(3)))
    env = {**os.environ, "FARM_REDIS_URL": farm_worker.redis_url, "FARM_VENV": sys.prefix}
    done = subprocess.run(["bash", str(ROOT / "farm"), "submit", "rel.jsonl", "-o", "out.jsonl",
                           "--max-new-tokens", "4", "--quiet"], cwd=here, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (here / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert not (ROOT / "out.jsonl").exists()
