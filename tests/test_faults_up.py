"""Redis killed with SIGKILL in the middle of a ``farm submit`` under ``farm up`` (issue 12): ``farm up``
restarts it from its append-only file, the workers and the running ``farm submit`` reconnect by
themselves (the client says Redis is unreachable while it is), and the output has every row once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import OUTPUT, ROOT, free_port, stop_process, wait_until
from tests.reliability_report import figures_from, record
from tests.test_producer_cli import count_lines, farm_env, prompt_file, read_lines

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

ROWS = 300


def start_farm(tmp_path: Path, redis_url: str) -> tuple[subprocess.Popen[bytes], Path]:
    out = OUTPUT / "faults-up"
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update({"PYTHONPATH": str(ROOT), "FARM_REDIS_URL": redis_url, "FARM_HEARTBEAT_SECONDS": "0.5"})
    cmd = [sys.executable, "-m", "ops.cli", "up", "--model-size", "tiny", "--gpus", "none", "--no-ui",
           "--flower-port", str(free_port()), "--metrics-port", "0", "--data-dir", str(tmp_path / "data")]
    log_path = out / f"farm-up-{int(time.time())}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return process, log_path


def test_redis_sigkill_under_farm_up_mid_job(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    farm, farm_log = start_farm(tmp_path, url)
    submit: subprocess.Popen[str] | None = None
    try:
        wait_until(lambda: farm.poll() is not None or "[farm] ready:" in farm_log.read_text(), 300, "farm up not ready")
        assert farm.poll() is None, farm_log.read_text()[-3000:]
        (redis_pid,) = map(int, re.findall(r"started redis \(pid (\d+)\)", farm_log.read_text()))
        prompts, out = prompt_file(tmp_path / "prompts.jsonl", "redis kill", ROWS), tmp_path / "out.jsonl"
        stderr = tmp_path / "submit.log"
        with open(stderr, "w") as log:
            submit = subprocess.Popen([sys.executable, "-m", "ops.cli", "submit", str(prompts), "-o", str(out),
                                       "--max-new-tokens", "8", "--quiet"], cwd=ROOT, env=farm_env(url),
                                      stderr=log, text=True)
        wait_until(lambda: submit.poll() is not None or count_lines(out) >= 60, 240, "the job made no progress")
        written_at_kill = count_lines(out)
        os.kill(redis_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: "redis exited with code -9; restarting" in farm_log.read_text(), 30, "death not seen")
        code = submit.wait(300)
        finished_after = time.monotonic() - killed_at
        said = stderr.read_text()
    finally:
        if submit is not None and submit.poll() is None:
            stop_process(submit)
        stop_process(farm, timeout=90)
    lines = read_lines(out)
    ids = [f"{lines[0]['job_id']}:{i}" for i in range(ROWS)]
    figures = figures_from("redis SIGKILL under farm up", ids, [str(line["id"]) for line in lines], {}, {},
                           written_at_kill=written_at_kill, job_done_after_kill_s=round(finished_after, 1))
    record(figures)
    assert code == 0, said
    assert [line["index"] for line in lines] == list(range(ROWS))
    assert (figures.completed, figures.lost, figures.duplicated) == (ROWS, 0, 0)
    assert len(re.findall(r"started redis \(pid \d+\)", farm_log.read_text())) == 2
    assert "is unreachable, retrying" in said and "is back; carrying on" in said, said
