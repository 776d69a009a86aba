"""Faults a real farm meets (issue 12), each with its figures in the reliability report: a worker
killed with SIGKILL while it holds rows (its messages come back by ownership, with the default
visibility timeout of hours), a late duplicate result, Redis killed under supervision, and a
Redis that accepts connections and never answers."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer import FarmClient
from protocol.errors import FarmUnavailable
from protocol.names import owners_key
from protocol.ownership import parse_record
from protocol.settings import FarmSettings
from tests.conftest import RedisServer, start_worker, wait_until
from tests.reliability_report import figures_from, record

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def counters(db: redis.Redis, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in db.hgetall(key).items()}


def held_by(db: redis.Redis, worker: str) -> int:
    """Messages whose owner record names a process of ``worker``."""
    return sum(parse_record(r)[0].startswith(f"{worker}/") for r in db.hvals(owners_key()))


def rows(tag: str, count: int) -> list[str]:
    return [f"{tag} row {i}" for i in range(count)]


def test_sigkill_of_one_of_two_workers_restores_its_rows_in_seconds(redis_server: RedisServer, tiny_model: Path,
                                                                     tmp_path: Path) -> None:
    url, db = redis_server.url("faults-kill"), redis_server.client("faults-kill")
    db.flushdb()
    settings = {"count_executions": 1, "heartbeat_seconds": 2.0, "max_inflight": 32}  # the default heartbeat
    victim = start_worker(url, tiny_model, tmp_path, name="victim@faults", **settings)
    other = start_worker(url, tiny_model, tmp_path, name="other@faults", **settings)
    try:
        client = FarmClient(url)
        job = client.submit_job(rows("kill", 300), max_new_tokens=8)
        wait_until(lambda: held_by(db, "victim@faults") >= 8 and len(counters(db, "farm:executions")) >= 40,
                   120, "the victim did not take rows")
        held = held_by(db, "victim@faults")
        os.kill(victim.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: held_by(db, "victim@faults") == 0, 60, "the victim's rows were not restored")
        restored_after = time.monotonic() - killed_at
        results = list(job.results(timeout=240))
        finished_after = time.monotonic() - killed_at
    finally:
        victim.stop()
        other.stop()
    ids = [f"{job.id}:{i}" for i in range(300)]
    figures = figures_from("worker SIGKILL, 1 of 2 (owner)", ids, [r.id for r in results if r.ok],
                           counters(db, "farm:executions"), counters(db, "farm:redelivered"),
                           held_at_kill=held, restore_s=round(restored_after, 1),
                           job_done_after_kill_s=round(finished_after, 1))
    record(figures)
    assert [r.id for r in results] == ids
    assert (figures.completed, figures.lost, figures.duplicated) == (300, 0, 0)
    assert figures.redelivered >= 1
    assert FarmSettings.from_env().visibility_timeout == 7200  # the default: restored by ownership


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A listener that accepts connections and never answers (a Redis behind a broken proxy)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.mark.timeout(60)
def test_black_holed_redis_raises_farm_unavailable(black_hole: int) -> None:
    url = f"redis://127.0.0.1:{black_hole}/0"
    started = time.monotonic()
    with pytest.raises(FarmUnavailable) as raised:
        FarmClient(url).generate("hello", max_new_tokens=2, timeout=120)
    seconds = time.monotonic() - started
    record(figures_from("black-holed Redis", [], [], {}, {}, raised_after_s=round(seconds, 1)))
    assert f"127.0.0.1:{black_hole}" in raised.value.message


def test_first_result_wins_and_late_duplicate_is_counted(redis_server: RedisServer) -> None:
    """Two workers finish one request (the first was cut off, its row ran again elsewhere): the
    first stored result stays, the late one is dropped and counted; a redelivered message of a
    finished request storing the same result again is no duplicate."""
    from protocol.celery_app import make_celery

    url, db = redis_server.url("faults-redis"), redis_server.client("faults-redis")
    db.flushdb()
    backend = make_celery(FarmSettings(redis_url=url)).backend
    first = {"id": "dup:0", "text": "from the rescuer", "worker": "rescuer@faults"}
    late = {"id": "dup:0", "text": "from the late worker", "worker": "cut@faults"}
    backend.store_result("dup:0", first, "SUCCESS")
    backend.store_result("dup:0", late, "SUCCESS")
    backend.store_result("dup:0", RuntimeError("late failure"), "FAILURE")
    backend.store_result("dup:0", first, "SUCCESS")  # the same result again
    meta = backend.get_task_meta("dup:0")
    duplicates = int(db.get("farm:duplicates") or 0)
    record(figures_from("late duplicate result", ["dup:0"], ["dup:0"], {"dup:0": 2}, {},
                        duplicates_counted=duplicates))
    assert (meta["status"], meta["result"]) == ("SUCCESS", first)
    assert duplicates == 2
    backend.store_result("dup:1", RuntimeError("failed first"), "FAILURE")  # a failure may be retried
    backend.store_result("dup:1", first, "SUCCESS")
    assert backend.get_task_meta("dup:1")["status"] == "SUCCESS"


def test_redis_watch_says_unreachable_once_then_back(redis_server: RedisServer) -> None:
    import io

    from producer.watch import RedisWatch

    said = io.StringIO()
    watch = RedisWatch(FarmSettings(redis_url=redis_server.url("faults-watch")), "submit", said)
    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    watch.check(dead)
    watch.check(dead)
    watch.check(redis_server.client("faults-watch"))
    assert said.getvalue().splitlines() == [
        f"farm submit: Redis at {redis_server.url('faults-watch')} is unreachable, retrying",
        f"farm submit: Redis at {redis_server.url('faults-watch')} is back; carrying on"]
