"""A worker's host cut off the network while it runs rows (issue 12): its liveness lapses, the other
host's worker returns its messages to the queue and runs them; when the link comes back, the cut
off worker's late results are dropped (the first stored result wins) and counted in
``farm:duplicates``. The figures (time to restore, to finish, duplicates) go to the reliability
report. Hosts as in the scale-out test (``tests/hosts.py``); without network namespaces (not
root) host B is cut off by freezing its process (SIGSTOP, then SIGCONT), which Redis sees alike."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer import FarmClient
from protocol.names import duplicates_key, executions_key, heartbeat_key, owners_key
from protocol.ownership import parse_record
from tests.conftest import OUTPUT, wait_until
from tests.hosts import Host, RemoteWorker, SharedRedis, remote_workers, shared_redis, two_hosts
from tests.reliability_report import figures_from, record

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

ROWS = 120


@pytest.fixture(scope="module")
def farm(tiny_model: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SharedRedis, list[RemoteWorker]]]:
    with two_hosts("p") as hosts, shared_redis(hosts, tmp_path_factory.mktemp("partition-redis")) as server, \
            remote_workers(hosts, server, tiny_model, OUTPUT / "partition") as workers:
        yield server, workers


def cut(host: Host, worker: RemoteWorker, off: bool) -> None:
    if host.namespace is not None:
        host.set_link(not off)
    else:
        os.kill(worker.process.pid, signal.SIGSTOP if off else signal.SIGCONT)


def held_by(db: redis.Redis, worker: str) -> int:
    return sum(parse_record(r)[0].startswith(f"{worker}/") for r in db.hvals(owners_key()))


def drained(db: redis.Redis, worker: str) -> bool:
    """Back online (a fresh heartbeat) with nothing in flight: its late results are stored or dropped."""
    raw = db.get(heartbeat_key(worker))
    return raw is not None and json.loads(raw)["in_flight"] == 0 and time.time() - json.loads(raw)["updated_at"] < 2


def test_a_cut_off_host_rows_finish_elsewhere_and_its_late_results_are_dropped(
        farm: tuple[SharedRedis, list[RemoteWorker]]) -> None:
    server, (a, b) = farm
    db = redis.Redis.from_url(server.url())
    client = FarmClient(server.url())
    job = client.submit_job([f"partition row {i}" for i in range(ROWS)], max_new_tokens=48, ignore_eos=True)
    wait_until(lambda: held_by(db, b.name) >= 4, 120, "host B took no rows")
    cut(b.host, b, off=True)
    cut_at = time.monotonic()
    # Counted once B is cut off: read before the cut, a fast B could still claim another row.
    held = held_by(db, b.name)
    try:
        wait_until(lambda: held_by(db, b.name) == 0, 60, "B's rows were not returned to the queue")
        restored_after = time.monotonic() - cut_at
        results = list(job.results(timeout=180))
        finished_after = time.monotonic() - cut_at
    finally:
        cut(b.host, b, off=False)
    wait_until(lambda: drained(db, b.name), 90, "host B did not come back")
    job.close()
    again = list(client.job(job.id).results(timeout=30))
    duplicates = int(db.get(duplicates_key()) or 0)
    runs = {k.decode(): int(v) for k, v in db.hgetall(executions_key()).items()}
    ids = [f"{job.id}:{i}" for i in range(ROWS)]
    figures = figures_from("host cut off (partition)", ids, [r.id for r in results], runs, {},
                           mode="netns" if b.host.namespace else "sigstop", held_at_cut=held,
                           restore_s=round(restored_after, 1), job_done_after_cut_s=round(finished_after, 1),
                           duplicates_counted=duplicates)
    record(figures)
    assert [r.id for r in results] == ids and all(r.ok and r.completion_tokens == 48 for r in results)
    assert (figures.completed, figures.lost, figures.duplicated) == (ROWS, 0, 0)
    assert [(r.worker, r.text) for r in again] == [(r.worker, r.text) for r in results]  # the first result stayed
    assert duplicates <= figures.notes["executed_twice"] <= held  # only B's rows ran twice, each dropped once
