"""The Farm tab's data: workers from their heartbeats, queue depths, recent batches."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pandas as pd

from producer.client import FarmClient
from protocol.errors import FarmError
from protocol.heartbeat import WorkerHeartbeat
from protocol.settings import FarmSettings

WORKER_COLUMNS = ["worker", "device", "model", "adapters", "running", "waiting", "batches", "mean batch",
                  "tokens/s", "beat (s ago)"]
BATCH_COLUMNS = ["time", "worker", "batch size", "tokens/s"]
BATCH_DTYPES = {"time": "datetime64[ms]", "worker": "str", "batch size": "float64", "tokens/s": "float64"}
"""Typed even when empty: Gradio's chart fixes its axis types from the first frame it gets (the
page's first refresh, before any batch ran), and an untyped empty frame makes every axis a
category axis for good (epoch milliseconds as labels, numbers out of order)."""


WORKER_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                  "#bcbd22", "#17becf")


@dataclass
class FarmView:
    summary: str
    workers: pd.DataFrame
    batches: pd.DataFrame


def farm_view(client: FarmClient, flower: str) -> FarmView:
    """What the Farm tab shows now; an unreachable Redis is a message, not an exception."""
    try:
        workers, depths = client.heartbeats(), client.queue_depths()
    except FarmError as error:
        return FarmView(f"**Farm unreachable**: {error.message}\n\n{flower_link(flower)}", _frame([], WORKER_COLUMNS),
                        batches_frame([]))
    return FarmView(summary(workers, depths, flower), workers_frame(workers), batches_frame(workers))


def summary(workers: list[WorkerHeartbeat], depths: dict[str, int], flower: str) -> str:
    online = f"**{len(workers)} worker{'s' if len(workers) != 1 else ''} online**" if workers else (
        "**No worker online**: start one with `./farm worker` or `./farm up`.")
    queues = ", ".join(f"{name}: {n}" for name, n in depths.items())
    rate = sum(w.tokens_per_second for w in workers)
    return f"{online} · queued: {queues} · {rate:.1f} tokens/s over the last minute · {flower_link(flower)}"


def flower_link(url: str) -> str:
    return f"[Open Flower (tasks, workers)]({url})"


def flower_url(settings: FarmSettings, host_header: str | None) -> str:
    """Flower on the host the browser used to reach the UI (loopback when unknown)."""
    host = (host_header or "").rsplit(":", 1)[0] or settings.ui_host
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{settings.flower_port}/"


def workers_frame(workers: list[WorkerHeartbeat]) -> pd.DataFrame:
    """One row per worker; tokens/s is over the busy time of the last minute."""
    now = time.time()
    rows = [[w.name or "?", w.device, _model(w), ", ".join(w.adapters), w.running, w.waiting, w.batches,
             round(w.mean_batch_size, 2), round(w.tokens_per_second, 1), round(w.seconds_since_beat(now), 1)]
            for w in workers]
    return _frame(rows, WORKER_COLUMNS)


def batches_frame(workers: list[WorkerHeartbeat]) -> pd.DataFrame:
    """One row per recent batch of every worker: when, its size and its speed."""
    rows = [[pd.Timestamp(b.at, unit="s"), w.name or "?", b.size, round(b.tokens_per_second, 1)]
            for w in workers for b in w.recent_batches]
    return _frame(sorted(rows, key=lambda r: r[0]), BATCH_COLUMNS).astype(BATCH_DTYPES)


def worker_colors(batches: pd.DataFrame) -> dict[str, str]:
    """A colour per worker in the charts. Gradio draws a chart's colour scale from the workers in
    its data when it builds the chart, and only swaps the data afterwards: a chart built before
    any batch had no colour for anyone, so nothing showed. A changed colour map rebuilds it."""
    names = sorted(set(batches["worker"]))
    return {name: WORKER_PALETTE[i % len(WORKER_PALETTE)] for i, name in enumerate(names)}


def _model(worker: WorkerHeartbeat) -> str:
    """The model's last path part (``Llama-2-7b-hf``, a local directory's name) and its
    quantization, short enough for the table to fit."""
    name = worker.model_path.rstrip("/").rsplit("/", 1)[-1]
    quant = worker.quant or "none"
    return name if quant == "none" else f"{name} ({quant})"


def _frame(rows: list[list[Any]], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)
