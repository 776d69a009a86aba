"""``farm status``: Redis, the models served, the workers online and the queues, in one screen.

Everything comes from Redis: the workers' heartbeat records (``FarmClient.heartbeats()``), the
models they serve (``FarmClient.models()``) and the queue lengths (``FarmClient.queue_depths()``,
per model: a model without a live worker shows its bulk rows waiting). If Redis does not answer, one line says so and
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
from protocol.models import ServedModel
from protocol.names import QUEUES, model_queue
from protocol.settings import FarmSettings


COLUMNS = ("worker", "host", "device", "model", "quant", "state", "batches", "requests", "mean batch", "tok/s",
           "run/wait", "queue wait", "1st token", "ms/token", "failed", "seen", "metrics")
NUMERIC = set(COLUMNS[6:])
DROP_ORDER = ("metrics", "host", "quant", "queue wait", "ms/token", "batches", "mean batch", "seen", "1st token",
              "device", "failed")
"""Columns left out, first to last, until the table fits the terminal: identity, load and speed
(worker, model, state, requests, tok/s, run/wait) stay; ``--wide`` shows every column."""


def workers_table(workers: list[WorkerHeartbeat], now: float | None = None,
                  columns: tuple[str, ...] = COLUMNS) -> Table:
    """One row per worker: where it runs, what it serves, how it batches (``columns`` of ``COLUMNS``)."""
    now = time.time() if now is None else now
    table = Table(title=f"Workers online: {len(workers)}", title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column in NUMERIC else "left", no_wrap=column in NUMERIC,
                         overflow="fold")
    picked = [COLUMNS.index(column) for column in columns]
    for w in sorted(workers, key=lambda w: w.name):
        row = worker_row(w, now)
        table.add_row(*(row[i] for i in picked))
    return table


def fitting_columns(workers: list[WorkerHeartbeat], width: int, now: float | None = None) -> tuple[str, ...]:
    """The most of ``COLUMNS`` whose table fits ``width`` cells unshrunk, dropping by ``DROP_ORDER``."""
    columns: tuple[str, ...] = COLUMNS
    for drop in (None, *DROP_ORDER):
        columns = tuple(c for c in columns if c != drop)
        if natural_width(workers_table(workers, now, columns)) <= width:
            break
    return columns


def natural_width(table: Table) -> int:
    """How wide ``table`` draws when nothing is cut or wrapped."""
    console = Console(width=10_000)
    return console.measure(table).maximum


def worker_row(w: WorkerHeartbeat, now: float) -> list[str]:
    """Every cell of ``COLUMNS`` for ``w``."""
    device = w.device or "?"
    if w.cuda_visible_devices:
        device += f" (GPU {w.cuda_visible_devices})"
    return [
        w.name or "?", w.host or "?", device, w.model_name or Path(w.model_path).name or "?", w.quant, w.state,
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
    title = "Queues (messages waiting for a worker)"
    table = Table(title=title, title_justify="left", min_width=len(title))
    table.add_column("queue")
    table.add_column("waiting", justify="right")
    for queue, depth in depths.items():
        table.add_row(queue, str(depth))
    return table


def models_table(models: list[ServedModel], depths: dict[str, int]) -> Table:
    """One row per model served now or with messages waiting: its workers, adapters and queues."""
    table = Table(title=f"Models served: {len(models)}", title_justify="left")
    for column in ("model", "workers", "adapters", *(f"{kind} waiting" for kind in QUEUES)):
        table.add_column(column, justify="right" if column.endswith("waiting") else "left")
    waiting = {q.partition(".")[2] for q, n in depths.items() if "." in q and n}
    live = {m.name: m for m in models}
    for name in sorted({*live, *waiting}):
        model = live.get(name, ServedModel(name))
        table.add_row(name, ", ".join(model.workers) or "none online", ", ".join(model.adapters) or "-",
                      *(str(depths.get(model_queue(kind, name), 0)) for kind in QUEUES))
    return table


def snapshot(settings: FarmSettings) -> dict[str, Any]:
    """What the screen shows, as data (``--json``); raises ``FarmUnavailable`` if Redis is down."""
    from producer.client import FarmClient

    client = FarmClient(settings=settings)
    client.ping()
    return {"redis": settings.redacted_redis_url(), "workers": client.heartbeats(), "models": client.models(),
            "queues": client.queue_depths(), "jobs": client.detached_jobs()}


def print_unshrunk(table: Table, console: Console) -> None:
    """``table`` at its natural width, wider than the terminal if need be (rich shrinks to fit)."""
    width = console.width
    console.width = max(width, natural_width(table))
    try:
        console.print(table)
    finally:
        console.width = width


def render(state: dict[str, Any], console: Console, wide: bool = False) -> None:
    """The screen at ``console.width``: columns dropped to fit unless ``wide`` (then lines may be longer)."""
    console.print(f"[bold]Redis[/bold] {state['redis']}: reachable")
    workers = state["workers"]
    columns = COLUMNS if wide else fitting_columns(workers, console.width)
    table = workers_table(workers, columns=columns)
    if wide:
        print_unshrunk(table, console)
    else:
        console.print(table)
    hidden = [c for c in COLUMNS if c not in columns]
    if hidden and workers:
        console.print(f"Hidden to fit {console.width} columns: {', '.join(hidden)} (--wide shows all)")
    if not state["workers"]:
        console.print("No worker online: start one with `./farm up` or `./farm worker`.")
    if state.get("models") or any("." in q for q in state["queues"]):
        console.print(models_table(state.get("models", []), state["queues"]))
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
    parser.add_argument("--wide", action="store_true",
                        help="every column, however wide the terminal (by default columns are hidden to fit it)")
    args = parser.parse_args(argv)
    settings = FarmSettings.from_env()
    try:
        state = snapshot(settings)
    except FarmUnavailable as error:
        print(f"farm status: {error.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**state, "workers": [w.to_dict() for w in state["workers"]],
                          "models": [m.to_dict() for m in state["models"]],
                          "jobs": [dataclasses.asdict(p) for p in state["jobs"]]}, indent=2))
    else:
        render(state, Console(), wide=args.wide)
    return 0


if __name__ == "__main__":
    sys.exit(main())
