"""The machine's limits for a model: how fast decode could go if it only streamed the weights
(memory bandwidth) or only did the matmuls (compute), and each run's fraction of them.

Measured once per model's run: copy bandwidth (a large tensor copied, bytes read plus bytes
written, as STREAM's "copy" counts them) and fp32 2048x2048 matmul throughput, both on the
worker's torch thread count. Derived (pure):

- batch-1 bandwidth bound: a decode step streams every weight once, so one row decodes at most
  ``bandwidth / weight bytes`` tokens per second;
- batch-16 bandwidth bound: the same step feeds 16 rows, 16 times that;
- compute bound: ``2 * parameters`` FLOPs per token, ``matmul FLOP/s / (2 * parameters)``.

Weight bytes count every distinct parameter (tied embeddings once), the input embedding too
although a step reads only a few of its rows: the same convention as issue 17's figures.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

COPY_BYTES = 256 * 2**20
"""Size of the copied tensor: far beyond any cache."""
MATMUL_N = 2048
BATCH = 16


@dataclass(frozen=True)
class Machine:
    """What this machine measured, on ``threads`` torch threads."""

    copy_gb_s: float
    matmul_gflop_s: float
    threads: int
    cpu: str = ""
    """The CPU's model name: which of MKL and oneDNN runs a few rows faster depends on it."""


@dataclass(frozen=True)
class Bounds:
    """A model's limits on a machine, in tokens per second."""

    params: int
    weight_bytes: int
    batch1_tok_s: float
    batch16_tok_s: float
    compute_tok_s: float

    def to_dict(self) -> dict[str, Any]:
        return {key: round(value, 2) if isinstance(value, float) else value for key, value in asdict(self).items()}


def derive(machine: Machine, params: int, bytes_per_param: int = 4) -> Bounds:
    """The bounds of a model of ``params`` parameters (fp32: 4 bytes each) on ``machine``."""
    if params <= 0 or bytes_per_param <= 0:
        raise ValueError(f"params and bytes_per_param must be positive, got {params} and {bytes_per_param}")
    weight_bytes = params * bytes_per_param
    batch1 = machine.copy_gb_s * 1e9 / weight_bytes
    return Bounds(params, weight_bytes, batch1, BATCH * batch1, machine.matmul_gflop_s * 1e9 / (2 * params))


def fractions(tokens_per_s: float, bounds: Bounds) -> dict[str, float]:
    """A run's throughput as a fraction of each bound."""
    return {"of_batch1_bw": round(tokens_per_s / bounds.batch1_tok_s, 4),
            "of_batch16_bw": round(tokens_per_s / bounds.batch16_tok_s, 4),
            "of_compute": round(tokens_per_s / bounds.compute_tok_s, 4)}


def with_fractions(rows: list[dict[str, Any]], bounds: Bounds) -> list[dict[str, Any]]:
    """The rows, each measured one with its fractions of the bounds."""
    return [{**row, **fractions(row["tokens_per_s"], bounds)} if row.get("tokens_per_s") else row for row in rows]


def measure(threads: int, repeats: int = 5) -> Machine:
    """Copy bandwidth and matmul throughput on ``threads`` torch threads (the best of ``repeats``:
    a bound is what the machine can do, not what it did while busy), off the main thread as the
    worker's model thread runs."""
    from worker.devices import on_own_thread

    return on_own_thread(lambda: _measure(threads, repeats))


def _measure(threads: int, repeats: int) -> Machine:
    import torch

    torch.set_num_threads(threads)
    return Machine(round(_copy_gb_s(repeats), 2), round(_matmul_gflop_s(repeats), 1), threads, cpu_name())


def cpu_name() -> str:
    """The CPU's vendor and model name (Linux ``/proc/cpuinfo``), or ``platform.processor()``."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return " ".join(v for v in (fields.get("vendor_id", ""), fields.get("model name", "")) if v) or platform.processor()


def _copy_gb_s(repeats: int) -> float:
    import torch

    src = torch.ones(COPY_BYTES // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * COPY_BYTES / best / 1e9


def _matmul_gflop_s(repeats: int) -> float:
    import torch

    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    out = torch.empty(MATMUL_N, MATMUL_N)
    torch.mm(a, b, out=out)  # warm up
    best = min(_timed(lambda: torch.mm(a, b, out=out)) for _ in range(repeats))
    return 2 * MATMUL_N**3 / best / 1e9


def _timed(work: Any) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started
