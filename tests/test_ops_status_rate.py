"""``farm status`` tokens/s is the rate a client measures: a real worker on the tiny model is kept
busy for a bounded time by clients that always have more requests waiting than its batch holds,
the clients count the completion tokens they got over the wall time, and ``farm status``
(heartbeat: completion tokens of the last 60 s of batches over their busy seconds) must agree
within 10 %. A correctness check of a measured rate, not a speed assertion: the worker is never
idle, so busy time and wall time are the same minute's."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.status import COLUMNS
from producer import FarmClient
from protocol.heartbeat import TOKENS_PER_SECOND_WINDOW
from tests.conftest import RedisServer, WorkerProcess, start_worker, wait_until
from tests.test_ops_status import cells, farm_status

pytestmark = pytest.mark.integration

BUSY_SECONDS = 25.0
"""How long the clients keep sending; well inside the rate's window, so every batch counts."""
BATCH = 8
CLIENTS = 3 * BATCH
"""Requests outstanding at once: a batch's worth running, twice that waiting, so the engine
always has a row to start when one ends (no idle gap for the worker to leave out)."""
NEW_TOKENS = 48


def keep_busy(client: FarmClient, seconds: float) -> tuple[int, int, float]:
    """``CLIENTS`` threads, each sending one request after another until ``seconds`` have
    passed; returns (requests, completion tokens, wall seconds from the first send to the last
    result)."""
    lock, totals = threading.Lock(), [0, 0]
    stop_at = time.monotonic() + seconds
    errors: list[BaseException] = []

    def one_client(index: int) -> None:
        n = 0
        try:
            while time.monotonic() < stop_at:
                result = client.generate(f"Client {index} request {n}: tell a story", max_new_tokens=NEW_TOKENS,
                                         ignore_eos=True, timeout=120)
                assert result.ok and result.completion_tokens == NEW_TOKENS, result
                with lock:
                    totals[0] += 1
                    totals[1] += result.completion_tokens
                n += 1
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)

    threads = [threading.Thread(target=one_client, args=(i,), daemon=True) for i in range(CLIENTS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 180)
    wall = time.monotonic() - started
    assert not errors, errors[:3]
    return totals[0], totals[1], wall


@pytest.fixture(scope="module")
def rate_worker(redis_server: RedisServer, tiny_model: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    worker = start_worker(redis_server.url("ops-status-rate"), tiny_model, tmp_path_factory.mktemp("rate"),
                          name="rate@test", max_batch_size=BATCH, max_inflight=2 * CLIENTS)
    yield worker
    worker.stop()


def test_status_tokens_per_second_is_the_rate_a_client_measures(rate_worker: WorkerProcess) -> None:
    assert BUSY_SECONDS + 20 < TOKENS_PER_SECOND_WINDOW  # the whole busy period is in the window
    client = FarmClient(rate_worker.redis_url)
    requests, tokens, wall = keep_busy(client, BUSY_SECONDS)
    client_rate = tokens / wall
    # The worker records a busy stretch when it goes idle; its heartbeat then counts every request.
    wait_until(lambda: (beat := rate_worker.heartbeat()) is not None and beat.requests == requests
               and beat.running == 0, 30, "the heartbeat did not count every request")
    status = json.loads(farm_status(rate_worker, 200, "--json"))
    (worker,) = [w for w in status["workers"] if w["name"] == rate_worker.name]
    status_rate = float(worker["tokens_per_second"])
    print(f"client: {requests} requests, {tokens} tokens in {wall:.1f}s = {client_rate:.1f} tok/s; "
          f"farm status: {status_rate:.1f} tok/s ({status_rate / client_rate - 1:+.1%})")
    assert worker["tokens"] == tokens  # every token the clients got, and no other
    assert abs(status_rate - client_rate) <= 0.10 * client_rate, (status_rate, client_rate)
    screen = cells(farm_status(rate_worker, 200, "--wide"))
    row = screen[screen.index(rate_worker.name):][:len(COLUMNS)]
    assert row[COLUMNS.index("tok/s")] == f"{status_rate:.1f}", row
