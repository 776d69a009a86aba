"""The worker's OpenMP threads spin briefly, then sleep, instead of spinning against Redis and Celery threads:
``OMP_WAIT_POLICY=PASSIVE`` is in its environment before torch loads (docs/DESIGN.md, "OpenMP threads spin briefly")."""

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
        assert launch.env["GOMP_SPINCOUNT"] == "30000"
        assert launch.env["CUDA_VISIBLE_DEVICES"] in ("0", "1")


def test_an_operators_own_setting_wins() -> None:
    (launch,) = worker_launches(plan_workers("cpu", 0, "h"), {"OMP_WAIT_POLICY": "ACTIVE"}, 0, "info")
    assert launch.env["OMP_WAIT_POLICY"] == "ACTIVE"
    assert launch.env["KMP_BLOCKTIME"] == THREAD_POLICY["KMP_BLOCKTIME"]


@pytest.mark.integration
def test_a_started_worker_spins_openmp_briefly(redis_server: RedisServer, tiny_model: Path,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # libgomp prints the settings it runs with when OMP_DISPLAY_ENV is set: a spin count of 30000
    # is the worker's (unset, it spins 300,000 times; under OMP_WAIT_POLICY=PASSIVE alone, 0).
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
    assert "GOMP_SPINCOUNT = '30000'" in log, log[-2000:]


def test_torch_work_on_its_own_thread_leaves_no_openmp_team_behind() -> None:
    # Each thread that runs a parallel op gets an OpenMP team; while it lives, libgomp counts more
    # threads than cores and stops the model thread's spinning. A thread that ends frees its team.
    import os
    import time

    import torch

    from worker.devices import on_own_thread

    def count() -> int:
        return len(os.listdir("/proc/self/task"))

    def work() -> int:
        torch.randn(256, 256) @ torch.randn(256, 256)
        return count()

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = count()
        inside = on_own_thread(work)
    finally:
        torch.set_num_threads(threads)
    deadline = time.monotonic() + 10  # the ended threads leave /proc a moment after the join
    while count() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert inside >= before + 2  # the thread itself and its team's second OpenMP thread
    assert count() == before
