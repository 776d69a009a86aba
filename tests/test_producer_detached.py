"""Detached jobs: handed to the farm, pumped by the job runner of a ``farm api`` process with no
client attached; one runner at a time, taken over when it dies. Real Redis, worker and API."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from rich.console import Console

from ops.status import render, snapshot
from producer import FarmClient
from protocol.names import DETACHED_JOBS, JobKeys, executions_key
from tests.api_server import start_api
from tests.conftest import WorkerProcess, wait_until
from tests.test_producer_cli import farm

pytestmark = pytest.mark.integration


def executions(client: FarmClient, job_id: str) -> dict[int, int]:
    counts = client.redis.hgetall(executions_key())
    prefix = f"{job_id}:".encode()
    return {int(k[len(prefix):]): int(v) for k, v in counts.items() if k.startswith(prefix)}


def test_a_detached_job_waits_for_a_runner_and_runs_with_no_client(client: FarmClient, tmp_path: Path) -> None:
    prompts = [f"detached row {i}" for i in range(40)]
    job = client.submit_job(prompts, "detached-a", detach=True, max_new_tokens=4)
    job.close()
    assert job.progress().sent == 0 and job.progress().total == 40  # nobody pumps it yet
    assert client.redis.zscore(DETACHED_JOBS, "detached-a") is not None
    state = snapshot(client.settings)  # farm status lists it
    assert "detached-a" in [p.job_id for p in state["jobs"]]
    console = Console(record=True, width=200)
    render(state, console)
    text = console.export_text()
    assert "Server-side jobs" in text and "detached-a" in text and "0/40" in text
    server = start_api(client.settings.redis_url, tmp_path)
    try:
        follower = client.job("detached-a")
        results = list(follower.results(timeout=120))
        wait_until(lambda: client.redis.zscore(DETACHED_JOBS, "detached-a") is None, 10, "job left in the registry")
    finally:
        server.close()
    expected = [client.generate(p, max_new_tokens=4, timeout=60).text for p in prompts[:3]]
    assert [r.text for r in results[:3]] == expected
    assert len(results) == 40 and all(r.ok for r in results)
    assert executions(client, "detached-a") == dict.fromkeys(range(40), 1)


def test_farm_submit_detach_prints_the_id_and_farm_job_results_reads_it(farm_worker: WorkerProcess,
                                                                        tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"cli detached {i}"}) + "\n" for i in range(12)))
    server = start_api(farm_worker.redis_url, tmp_path)
    try:
        submitted = farm(farm_worker.redis_url, "submit", str(prompts), "--detach", "--max-new-tokens", "3")
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        out = tmp_path / "out.jsonl"
        read = farm(farm_worker.redis_url, "job", "results", job_id, "-o", str(out))
        assert read.returncode == 0, read.stderr
        status = farm(farm_worker.redis_url, "job", "status", job_id, "--json")
    finally:
        server.close()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(12))
    assert all(line["job_id"] == job_id and line["finish_reason"] in ("length", "stop") for line in lines)
    assert json.loads(status.stdout)["state"] == "finished"


def test_killing_the_pumping_api_replica_hands_the_job_to_another(client: FarmClient, tmp_path: Path) -> None:
    first = start_api(client.settings.redis_url, tmp_path / "a")
    second = start_api(client.settings.redis_url, tmp_path / "b")
    try:
        job = client.submit_job([f"takeover row {i}" for i in range(300)], "detached-takeover", detach=True,
                                max_new_tokens=6, window=16)
        lease = JobKeys(job.id).producer
        wait_until(lambda: client.redis.get(lease) and job.progress().completed >= 20, 120, "no runner pumped it")
        holder = int(client.redis.get(lease).decode().split(":")[1])  # type: ignore[union-attr]
        pumping, other = (first, second) if holder == first.process.pid else (second, first)
        assert holder == pumping.process.pid
        os.kill(pumping.process.pid, signal.SIGKILL)
        pumping.process.wait(10)
        results = list(job.results(timeout=300))
        new_holder = client.redis.get(lease)
        assert new_holder is None or int(new_holder.decode().split(":")[1]) == other.process.pid
    finally:
        first.close()
        second.close()
    assert len(results) == 300 and all(r.ok for r in results)
    assert executions(client, "detached-takeover") == dict.fromkeys(range(300), 1)
