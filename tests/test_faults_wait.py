"""A client waiting on a request while Redis stops (issue 12): it says "Redis is unreachable,
retrying" at once instead of freezing in silence, carries on when Redis is back (restarted from
its append-only file), and gives up with the current exit once its deadline has passed."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from producer import FarmClient
from protocol.names import INTERACTIVE_QUEUE
from protocol.schema import GenerationResult
from tests.conftest import ROOT, start_redis, start_worker, wait_until
from tests.reliability_report import figures_from, record
from tests.test_producer_cli import farm_env

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def test_a_wait_says_redis_is_unreachable_and_carries_on_after_a_restart(tiny_model: Path, tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis", appendonly=True)
    url = server.url()
    handle = FarmClient(url).submit("hello", max_new_tokens=4)  # no worker yet: it waits in the queue
    said: list[tuple[float, str]] = []
    got: list[GenerationResult] = []

    def wait() -> None:
        got.append(handle.result(timeout=180, on_outage=lambda message: said.append((time.monotonic(), message))))

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(0.5)
    server.stop()
    stopped = time.monotonic()
    worker = None
    try:
        wait_until(lambda: said, 30, "the wait said nothing of the outage")
        server = start_redis(tmp_path / "redis", port=server.port, appendonly=True)
        worker = start_worker(url, tiny_model, tmp_path)
        waiter.join(120)
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
    record(figures_from("redis stopped under a wait", [handle.id], [r.id for r in got], {}, {},
                        said_after_s=round(said[0][0] - stopped, 1)))
    assert [message for _, message in said] == [f"Redis at {url} is unreachable, retrying (for up to 60s)",
                                                f"Redis at {url} is back; carrying on"]
    assert len(got) == 1 and got[0].ok and got[0].id == handle.id


def test_farm_generate_says_so_and_gives_up_after_its_timeout(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    url = server.url()
    try:
        generate = subprocess.Popen([sys.executable, "-m", "ops.cli", "generate", "hello", "--timeout", "6"],
                                    cwd=ROOT, env=farm_env(url), stderr=subprocess.PIPE, text=True)
        wait_until(lambda: server.client().llen(INTERACTIVE_QUEUE) == 1, 30, "the request was not sent")
    finally:
        server.stop()
    stopped = time.monotonic()
    _, stderr = generate.communicate(timeout=60)
    gave_up_after = time.monotonic() - stopped
    record(figures_from("redis gone under farm generate", [], [], {}, {}, gave_up_after_s=round(gave_up_after, 1)))
    lines = stderr.strip().splitlines()
    assert generate.returncode == 1, stderr
    assert f"farm generate: Redis at {url} is unreachable, retrying (for up to 60s)" in lines, stderr
    assert lines[-1].startswith(f"farm generate: Redis at {url} is unreachable (") and "farm up" in lines[-1]
