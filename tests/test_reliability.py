"""Faults that really break things, each bounded in time and cleaning up after itself: a worker
killed mid-batch, Redis restarted mid-job, and a long load run. Each records its figures in the
reliability report (printed at the end of the test run)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from producer import FarmClient
from protocol.names import BULK_QUEUE
from tests.conftest import WorkerProcess, start_redis, start_worker, wait_until
from tests.reliability_report import figures_from, record

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def executions(client: FarmClient, key: str = "farm:executions") -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.redis.hgetall(key).items()}


def redeliveries(client: FarmClient) -> dict[str, int]:
    return executions(client, "farm:redelivered")


def submit_rows(client: FarmClient, prefix: str, count: int, **params: object) -> list[str]:
    ids = [f"{prefix}:{i}" for i in range(count)]
    for i, request_id in enumerate(ids):
        client.submit(f"row {i} of the job", queue=BULK_QUEUE, request_id=request_id, **params)
    return ids


def collect(client: FarmClient, ids: list[str], timeout: float) -> list[str]:
    """Ids of the rows that completed successfully, one per stored result."""
    done = []
    for request_id in ids:
        result = client.handle(request_id).result(timeout=timeout)
        if result.ok:
            done.append(result.id)
    return done


def test_worker_killed_mid_batch_loses_nothing(redis_server, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = redis_server.url("reliability-kill")
    settings = {"count_executions": 1, "visibility_timeout": 4, "max_inflight": 32}
    first = start_worker(url, tiny_model, tmp_path, name="doomed@test", **settings)
    client = FarmClient(url)
    ids = submit_rows(client, "kill", 300, max_new_tokens=8)
    wait_until(lambda: len(executions(client)) >= 40, 120, "the worker did not start the job")
    os.kill(first.process.pid, signal.SIGKILL)  # mid-batch: messages reserved, unacked
    first.process.wait(10)
    ran_before = len(executions(client))
    second = start_worker(url, tiny_model, tmp_path, name="rescuer@test", **settings)
    try:
        done = collect(client, ids, timeout=180)
    finally:
        second.stop()
    runs = executions(client)
    figures = figures_from("worker SIGKILL mid-batch", ids, done, runs, redeliveries(client),
                           ran_before_kill=ran_before)
    record(figures)
    assert (figures.completed, figures.lost, figures.duplicated) == (300, 0, 0)
    assert figures.redelivered >= 1, "no message of the killed worker was redelivered"
    assert "rescuer@test" in {client.handle(i).result(5).worker for i in ids}


def test_redis_restart_mid_job_completes(tiny_model: Path, tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis", appendonly=True)
    port = server.port
    worker: WorkerProcess | None = None
    try:
        worker = start_worker(server.url(), tiny_model, tmp_path, name="steady@test", count_executions=1,
                              visibility_timeout=15)
        client = FarmClient(server.url())
        ids = submit_rows(client, "restart", 200, max_new_tokens=8)
        wait_until(lambda: len(executions(client)) >= 30, 120, "the worker did not start the job")
        server.stop()  # SIGTERM: Redis flushes its append-only file
        time.sleep(1.0)
        server = start_redis(tmp_path / "redis", port=port, appendonly=True)
        done = collect(client, ids, timeout=240)
        figures = figures_from("redis restart mid-job", ids, done, executions(client), redeliveries(client))
        record(figures)
        assert (figures.completed, figures.lost, figures.duplicated) == (200, 0, 0)
        assert worker.process.poll() is None
        assert client.generate("after the restart", max_new_tokens=2, timeout=60).ok
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


def test_load_5000_requests_8_threads(redis_server, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = redis_server.url("reliability-restart")
    worker = start_worker(url, tiny_model, tmp_path, name="load@test", count_executions=1,
                          max_batch_size=32, max_inflight=128)
    client = FarmClient(url)
    try:
        client.generate("warm up", max_new_tokens=2, timeout=60)
        rss_start = rss_mb(worker.process.pid)

        def one_thread(t: int) -> tuple[list[str], list[str]]:
            ids, done = [], []
            for chunk in range(0, 625, 125):
                handles = [client.submit(f"load {t} {i}", max_new_tokens=2, request_id=f"load:{t}:{i}")
                           for i in range(chunk, chunk + 125)]
                ids += [h.id for h in handles]
                done += [r.id for r in (h.result(timeout=300) for h in handles) if r.ok]
            return ids, done

        with ThreadPoolExecutor(8) as pool:
            parts = list(pool.map(one_thread, range(8)))
        rss_end = rss_mb(worker.process.pid)
    finally:
        worker.stop()
    ids = [i for part in parts for i in part[0]]
    done = [i for part in parts for i in part[1]]
    figures = figures_from("load 5000 req / 8 threads", ids, done, executions(client), redeliveries(client),
                           rss_start_mb=round(rss_start), rss_end_mb=round(rss_end))
    record(figures)
    assert (figures.submitted, figures.completed, figures.lost, figures.duplicated) == (5000, 5000, 0, 0)
    assert figures.redelivered == 0
    assert rss_end < rss_start * 1.25 + 50, (rss_start, rss_end)
