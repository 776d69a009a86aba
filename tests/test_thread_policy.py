"""The worker's OpenMP threads sleep when idle instead of spinning against Redis and Celery threads:
``OMP_WAIT_POLICY=PASSIVE`` is in its environment before torch loads (docs/DESIGN.md, "Threads")."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import RedisServer, start_worker
from worker.devices import THREAD_POLICY, plan_workers, worker_launches


def test_every_launched_worker_gets_the_thread_policy() -> None:
    plans = plan_workers("auto", gpu_count=2, host="h")
    for launch in worker_launches(plans, {"PATH": "/bin"}, 0, "info"):
        assert launch.env["OMP_WAIT_POLICY"] == "PASSIVE"
        assert launch.env["KMP_BLOCKTIME"] == "0"
        assert launch.env["CUDA_VISIBLE_DEVICES"] in ("0", "1")


def test_an_operators_own_setting_wins() -> None:
    (launch,) = worker_launches(plan_workers("cpu", 0, "h"), {"OMP_WAIT_POLICY": "ACTIVE"}, 0, "info")
    assert launch.env["OMP_WAIT_POLICY"] == "ACTIVE"
    assert launch.env["KMP_BLOCKTIME"] == THREAD_POLICY["KMP_BLOCKTIME"]


@pytest.mark.integration
def test_a_started_worker_runs_openmp_without_spinning(redis_server: RedisServer, tiny_model: Path,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # libgomp prints the settings it runs with when OMP_DISPLAY_ENV is set: a spin count of 0 is
    # what OMP_WAIT_POLICY=PASSIVE makes of it (unset, it spins 300,000 times).
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OMP_DISPLAY_ENV", "VERBOSE")
    worker = start_worker(redis_server.url("thread-policy"), tiny_model, tmp_path, name="cpu@threads",
                          torch_threads=2)
    try:
        log = worker.log()
    finally:
        worker.stop()
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in log
    assert "GOMP_SPINCOUNT = '0'" in log, log[-2000:]
