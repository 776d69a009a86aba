"""Scale-out: workers on two "hosts" share one Redis; stopping one mid-job loses nothing.

Each host is a network namespace with a veth pair to this machine (``tests/hosts.py``): a
worker there reaches Redis only through the network, with the Redis password, as a worker on
another machine would. Where namespaces are not permitted (not root), the hosts are plain
processes with distinct names on loopback; the test then says so in its artifact.

A job of 200 short rows goes to the ``bulk`` queue through ``FarmClient``; both workers take
part; host B gets SIGTERM in the middle of the job (a warm shutdown: it finishes what it holds,
its unstarted messages go back to the queue); every row still completes, each exactly once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.client import FarmClient
from protocol.names import executions_key, heartbeat_key
from tests.conftest import OUTPUT, wait_until
from tests.hosts import Host, RemoteWorker, SharedRedis, two_hosts
from tests.hosts import remote_workers as start_remote_workers
from tests.hosts import shared_redis as start_shared_redis

pytestmark = pytest.mark.integration

ROWS = 200


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Host]]:
    with two_hosts("s") as made:
        yield made


@pytest.fixture(scope="module")
def shared_redis(hosts: list[Host], tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRedis]:
    with start_shared_redis(hosts, tmp_path_factory.mktemp("shared-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def remote_workers(hosts: list[Host], shared_redis: SharedRedis, tiny_model: Path) -> Iterator[list[RemoteWorker]]:
    with start_remote_workers(hosts, shared_redis, tiny_model, OUTPUT / "scaleout") as started:
        yield started


def test_a_host_reaches_redis_only_over_its_link(hosts: list[Host], shared_redis: SharedRedis) -> None:
    if hosts[0].namespace is None:
        assert hosts[0].redis_address == "127.0.0.1"  # process mode: nothing more to show
        return
    probe = ("import socket, sys\n"
             "def reach(a):\n"
             "    try:\n"
             f"        socket.create_connection((a, {shared_redis.port}), timeout=2).close(); return 1\n"
             "    except OSError:\n"
             "        return 0\n"
             f"print(socket.gethostname(), reach('127.0.0.1'), reach('{hosts[0].redis_address}'))")
    out = subprocess.run(hosts[0].wrap([sys.executable, "-c", probe]), capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == [hosts[0].name, "0", "1"], out.stderr


def test_job_spreads_over_two_hosts_and_survives_stopping_one(remote_workers: list[RemoteWorker],
                                                              shared_redis: SharedRedis) -> None:
    a, b = remote_workers
    client = FarmClient(shared_redis.url())
    local = redis.Redis.from_url(shared_redis.url())
    beats = {w["name"]: w for w in client.workers()}
    assert {beats[a.name]["host"], beats[b.name]["host"]} == ({a.host.name, b.host.name} if a.host.namespace
                                                              else {beats[a.name]["host"]})
    job = f"scaleout{int(time.time())}"
    handles = [client.submit(f"row {i}: the farm on two hosts", queue="bulk", request_id=f"{job}:{i}",
                             max_new_tokens=48, ignore_eos=True) for i in range(ROWS)]

    def b_took_part() -> bool:
        record = local.get(heartbeat_key(b.name))
        return record is not None and json.loads(record)["requests"] >= 8

    wait_until(b_took_part, 120, "host B took no rows")
    b.process.send_signal(signal.SIGTERM)  # mid-job: B finishes what it holds, the rest goes back
    done_at_stop = sum(1 for v in local.mget([f"celery-task-meta-{h.id}" for h in handles]) if v)
    assert b.process.wait(60) == 0, b.log_path.read_text()[-3000:]
    results = [h.result(timeout=180) for h in handles]
    by_worker = {name: sum(1 for r in results if r.worker == name) for name in (a.name, b.name)}
    executions = {k.decode(): int(v) for k, v in local.hgetall(executions_key()).items()}
    report = {"mode": "netns" if a.host.namespace else "processes", "rows": ROWS, "done_when_b_stopped": done_at_stop,
              "rows_by_worker": by_worker, "executions_over_1": sum(1 for h in handles if executions[h.id] > 1)}
    (OUTPUT / "scaleout").mkdir(parents=True, exist_ok=True)
    (OUTPUT / "scaleout" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(report)
    assert done_at_stop < ROWS, "the job ended before host B was stopped: make it longer"
    assert all(r.ok and r.completion_tokens == 48 for r in results)
    assert by_worker[a.name] > 0 and by_worker[b.name] > 0 and sum(by_worker.values()) == ROWS
    assert all(executions.get(h.id) == 1 for h in handles), "a row ran twice or never"
    assert local.get(heartbeat_key(b.name)) is None  # B said goodbye
