"""``farm status``: Redis, the workers online and the queues, in one screen.

Everything comes from Redis: the workers' heartbeat records (``FarmClient.heartbeats()``) and the
queue lengths (``FarmClient.queue_depths()``). If Redis does not answer, one line says so and
the exit code is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from protocol.errors import FarmUnavailable
from protocol.heartbeat import WorkerHeartbeat
from protocol.settings import FarmSettings


def workers_table(workers: list[WorkerHeartbeat], now: float | None = None) -> Table:
    """One row per worker: where it runs, what it serves, how it batches."""
    now = time.time() if now is None else now
    table = Table(title=f"Workers online: {len(workers)}", title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in NUMERIC else "left", no_wrap=column == "worker")
    for w in sorted(workers, key=lambda w: w.name):
        table.add_row(*worker_row(w, now))
    return table


COLUMNS = ("worker", "host", "device", "model", "quant", "state", "batches", "requests", "mean batch", "tok/s",
           "run/wait", "queue wait", "1st token", "ms/token", "failed", "seen", "metrics")
NUMERIC = set(COLUMNS[6:])


def worker_row(w: WorkerHeartbeat, now: float) -> list[str]:
    device = w.device or "?"
    if w.cuda_visible_devices:
        device += f" (GPU {w.cuda_visible_devices})"
    return [
        w.name or "?", w.host or "?", device, Path(w.model_path).name or "?", w.quant, w.state,
        str(w.batches), str(w.requests), f"{w.mean_batch_size:.1f}", f"{w.tokens_per_second:.1f}",
        f"{w.running}/{w.waiting}", _seconds(w.queue_wait_seconds), _seconds(w.first_token_seconds),
        _millis(w.decode_seconds_per_token), str(w.failed), f"{w.seconds_since_beat(now):.0f}s ago",
        str(w.metrics_port or "-"),
    ]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _millis(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def queues_table(depths: dict[str, int]) -> Table:
    table = Table(title="Queues (messages waiting for a worker)", title_justify="left")
    table.add_column("queue")
    table.add_column("waiting", justify="right")
    for queue, depth in depths.items():
        table.add_row(queue, str(depth))
    return table


def snapshot(settings: FarmSettings) -> dict[str, Any]:
    """What the screen shows, as data (``--json``); raises ``FarmUnavailable`` if Redis is down."""
    from producer.client import FarmClient

    client = FarmClient(settings=settings)
    client.ping()
    return {"redis": settings.redacted_redis_url(), "workers": client.heartbeats(), "queues": client.queue_depths(),
            "jobs": client.detached_jobs()}


def render(state: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]Redis[/bold] {state['redis']}: reachable")
    console.print(workers_table(state["workers"]))
    if not state["workers"]:
        console.print("No worker online: start one with `./farm up` or `./farm worker`.")
    console.print(queues_table(state["queues"]))
    if state.get("jobs"):
        console.print(jobs_table(state["jobs"]))


def jobs_table(jobs: list[Any]) -> Table:
    """The server-side jobs running (``farm submit --detach``, API batches)."""
    table = Table(title="Server-side jobs", title_justify="left")
    for name in ("job", "state", "done", "failed", "pending", "rows/s"):
        table.add_column(name, justify="left" if name in ("job", "state") else "right")
    for p in jobs:
        table.add_row(p.job_id, p.state, f"{p.completed}/{'?' if p.total is None else p.total}", str(p.failed),
                      str(p.pending), f"{p.rows_per_second:.1f}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="farm status", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the state as json instead of tables")
    args = parser.parse_args(argv)
    settings = FarmSettings.from_env()
    try:
        state = snapshot(settings)
    except FarmUnavailable as error:
        print(f"farm status: {error.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**state, "workers": [w.to_dict() for w in state["workers"]],
                          "jobs": [dataclasses.asdict(p) for p in state["jobs"]]}, indent=2))
    else:
        render(state, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
