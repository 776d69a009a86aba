"""A bounded soak (issue 12): one bulk job of 2,000 rows while a chaos thread SIGKILLs a random
worker every ~40 s and restarts Redis twice (SIGTERM once, SIGKILL once); loopback only, at most
10 minutes. Redis and the workers run under ``farm up``'s supervision machinery (``ops.supervise``
with ``ops.up.redis_spec``: append-only Redis, restarts with backoff) and its sweeper. The rows are
read in input order as ``farm submit`` writes them; the worst stall is the longest time between
two rows of that output. Not part of ``farm test``: ``python -m bench.soak [--rows N] [--out FILE]``.

Writes its figures to ``bench/results/soak.json``: rows lost and duplicated in the output (both
must be 0), rows executed more than once, late duplicates dropped, faults made, the worst stall.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

from bench.procs import free_port
from ops.make_model import ensure_model
from ops.supervise import Child, ChildSpec, Output, Supervisor
from ops.up import redis_spec
from producer import FarmClient
from protocol.names import duplicates_key, executions_key
from protocol.ownership import Sweeper
from protocol.settings import project_root

WORKERS = 3
KILL_EVERY = 40.0
REDIS_RESTARTS_AT = (50.0, 120.0)
"""Seconds into the job: SIGTERM at the first, SIGKILL at the second."""
LIMIT = 600.0
TOKENS = 64
"""New tokens per row (EOS ignored); with small batches (``FARM_MAX_BATCH_SIZE=2``) the job lasts
minutes on two cores, so that every fault lands in it."""
OUT = project_root() / "bench" / "results" / "soak.json"


class Farm:
    """Redis and the workers under the supervisor, polled (with the sweeper) from a thread."""

    def __init__(self, workdir: Path, model: Path) -> None:
        self.url = f"redis://127.0.0.1:{free_port()}/0"
        self.supervisor = Supervisor(Output(open(workdir / "farm.log", "w")), stable_seconds=30)  # noqa: SIM115
        (workdir / "redis").mkdir(parents=True, exist_ok=True)
        self.redis = self.supervisor.start(redis_spec(self.url, workdir / "redis"))
        self.workers = [self.supervisor.start(self._worker(i, model)) for i in range(WORKERS)]
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="supervise", daemon=True)

    def _worker(self, index: int, model: Path) -> ChildSpec:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("FARM_")}, "PYTHONPATH": str(project_root()),
               "FARM_REDIS_URL": self.url, "FARM_MODEL": str(model), "FARM_WORKER_NAME": f"cpu@soak{index}",
               "FARM_HEARTBEAT_SECONDS": "0.5", "FARM_COUNT_EXECUTIONS": "1", "FARM_MAX_INFLIGHT": "4",
               "FARM_MAX_BATCH_SIZE": "2"}
        return ChildSpec(f"worker{index}", [sys.executable, "-m", "worker.main", "--device", "cpu"], env,
                         restart=True, stop_timeout=30)

    def start(self) -> Farm:
        self._thread.start()
        return self

    def _supervise(self) -> None:
        sweeper = Sweeper(redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2), 0.5)
        while not self.stopping.wait(0.2):
            self.supervisor.poll()
            sweeper.poll()

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(10)
        self.supervisor.stop([[w.name for w in self.workers], ["redis"]])


def kill(child: Child, sig: signal.Signals) -> None:
    if child.pid is not None:
        os.killpg(child.pid, sig)


class Chaos:
    """Kills a random worker every ``KILL_EVERY`` seconds and restarts Redis at ``REDIS_RESTARTS_AT``."""

    def __init__(self, farm: Farm, seed: int = 12) -> None:
        self.farm, self.random = farm, random.Random(seed)
        self.faults: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def start(self) -> Chaos:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        plan = sorted([(t, "redis") for t in REDIS_RESTARTS_AT] +
                      [(KILL_EVERY * (i + 1), "worker") for i in range(int(LIMIT // KILL_EVERY))])
        for at, what in plan:
            if self.stop.wait(max(0.0, self.started + at - time.monotonic())):
                return
            self._fault(what)

    def _fault(self, what: str) -> None:
        if what == "redis":
            sig = signal.SIGTERM if not any(f["fault"] == "redis" for f in self.faults) else signal.SIGKILL
            child = self.farm.redis
        else:
            sig, child = signal.SIGKILL, self.random.choice(self.farm.workers)
        kill(child, sig)
        self.faults.append({"at_s": round(time.monotonic() - self.started, 1), "fault": what, "name": child.name,
                            "signal": sig.name})
        print(f"soak: {sig.name} {child.name} at {self.faults[-1]['at_s']}s", flush=True)


def read_job(client: FarmClient, rows: int) -> tuple[list[str], float, float]:
    """Submit the job and read its results in input order (as ``farm submit`` writes them);
    returns their ids, the worst stall (longest time between two rows of that output) and the
    time taken."""
    job = client.submit_job([f"soak row {i}" for i in range(rows)], "soak", max_new_tokens=TOKENS,
                            ignore_eos=True)
    started = last = time.monotonic()
    worst, ids = 0.0, []
    for result in job.results(timeout=LIMIT):
        now = time.monotonic()
        worst, last = max(worst, now - last), now
        ids.append(result.id)
    job.close()
    return ids, worst, time.monotonic() - started


def figures(client: FarmClient, rows: int, ids: list[str], worst: float, seconds: float,
            faults: list[dict[str, Any]]) -> dict[str, Any]:
    expected = [f"soak:{i}" for i in range(rows)]
    runs = {k.decode(): int(v) for k, v in client.redis.hgetall(executions_key()).items()}
    return {"rows": rows, "completed": len(set(ids) & set(expected)), "lost": len(set(expected) - set(ids)),
            "duplicated": len(ids) - len(set(ids)), "executed_twice": sum(1 for i in expected if runs.get(i, 0) > 1),
            "late_duplicates_dropped": int(client.redis.get(duplicates_key()) or 0),
            "worst_stall_s": round(worst, 1), "job_seconds": round(seconds, 1), "faults": faults,
            "worker_kills": sum(f["fault"] == "worker" for f in faults),
            "redis_restarts": sum(f["fault"] == "redis" for f in faults)}


def wait_ready(client: FarmClient, count: int) -> None:
    deadline = time.monotonic() + 300
    while len([w for w in client.heartbeats() if w.ready]) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the soak's workers did not become ready")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    workdir = project_root() / "test-output" / "soak" / str(int(time.time()))
    workdir.mkdir(parents=True, exist_ok=True)
    model = ensure_model(project_root() / ".farm" / "test-models" / "tiny", "tiny")
    farm = Farm(workdir, model).start()
    try:
        client = FarmClient(farm.url)
        wait_ready(client, WORKERS)
        chaos = Chaos(farm).start()
        ids, worst, seconds = read_job(client, args.rows)
        chaos.stop.set()
        report = figures(client, args.rows, ids, worst, seconds, chaos.faults)
    finally:
        farm.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "faults"}))
    return 0 if report["lost"] == 0 and report["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
