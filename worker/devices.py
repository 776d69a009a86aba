"""Which worker processes to start for ``--device``: pure planning, tested without a GPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


THREAD_POLICY = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "30000", "KMP_BLOCKTIME": "0"}
"""OpenMP settings of a worker process, set before torch is imported (the OpenMP runtime reads
them once, when it loads): an idle OpenMP thread spins a short while (``GOMP_SPINCOUNT``, about
0.3 ms), then sleeps. The gaps between the parallel regions of one decode step are shorter than
that, the gaps between steps and between requests longer: unset, libgomp spins ~300,000 times
(milliseconds) after every region, on the same few cores where the worker's Celery, Redis and
heartbeat threads (and, on one host, Redis itself and the clients) must run; under ``PASSIVE``
alone (spin count 0) every region wakes sleeping threads, and a 16-row decode step of the bench
model took 54 ms instead of 41 ms. libgomp spins at most ~100 times by itself whenever it manages
more OpenMP threads than the process has cores, which is why the model is loaded on a thread
that ends (``on_own_thread``). ``KMP_*`` say the same to Intel's OpenMP runtime, should a torch
build use it. A value already in the environment wins (docs/DESIGN.md, "OpenMP threads spin briefly")."""


def on_own_thread(work: Callable[[], T]) -> T:
    """``work()`` on a thread of its own that ends with it, for torch work done before the model
    thread starts (loading and prepacking the model). Each thread that runs a parallel torch op
    gets an OpenMP team of its own, kept until the thread ends; while a second team lives, libgomp
    counts more threads than cores and cuts the model thread's spinning to ~100 iterations
    (``THREAD_POLICY``): the bench model's 16-row step took 54 ms instead of 41 ms."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(work).result()


def with_thread_policy(env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``THREAD_POLICY``'s settings added where ``env`` has none of its own."""
    return {**THREAD_POLICY, **env}


def apply_thread_policy() -> None:
    """Put ``THREAD_POLICY`` into this process's environment; call it before torch is imported."""
    for key, value in THREAD_POLICY.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class WorkerPlan:
    """One worker process: its Celery node name, torch device and extra environment."""

    name: str
    device: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerLaunch:
    """How to start one planned worker as a child process (``farm worker`` and ``farm up``)."""

    name: str
    cmd: list[str]
    env: dict[str, str]


def worker_launches(plans: list[WorkerPlan], env: dict[str, str], metrics_port: int,
                    loglevel: str) -> list[WorkerLaunch]:
    """One pinned ``worker.main --in-process`` child per plan (exec'd, never forked after torch),
    each with its own name and metrics port. ``FARM_WORKER_NAME`` names a single worker only:
    two children under one name would be one Celery node and one heartbeat."""
    launches = []
    for index, plan in enumerate(plans):
        name = (env.get("FARM_WORKER_NAME") if len(plans) == 1 else None) or plan.name
        child_env = with_thread_policy({**env, **plan.env, "FARM_WORKER_NAME": name,
                                        "FARM_METRICS_PORT": str(metrics_port + index if metrics_port else 0)})
        cmd = [sys.executable, "-m", "worker.main", "--device", plan.device, "--in-process", "--loglevel", loglevel]
        launches.append(WorkerLaunch(name, cmd, child_env))
    return launches


def plan_workers(device: str, gpu_count: int, host: str | None = None) -> list[WorkerPlan]:
    """``cpu`` -> one CPU worker; ``cuda:N`` -> one pinned to GPU N; ``auto`` -> one per GPU.

    A pinned process sees only its GPU (``CUDA_VISIBLE_DEVICES=N``) and uses it as ``cuda:0``:
    CUDA state is never shared or forked between devices.
    """
    host = host or socket.gethostname()
    if device == "cpu" or (device == "auto" and gpu_count == 0):
        return [WorkerPlan(f"cpu@{host}", "cpu", {"CUDA_VISIBLE_DEVICES": ""})]
    if device == "auto":
        return [_gpu(i, host) for i in range(gpu_count)]
    if device.startswith("cuda:") and device[5:].isdigit():
        index = int(device[5:])
        if index >= gpu_count:
            raise ValueError(f"--device {device}: only {gpu_count} GPU(s) visible")
        return [_gpu(index, host)]
    raise ValueError(f"--device must be cpu, cuda:N or auto, got {device!r}")


def _gpu(index: int, host: str) -> WorkerPlan:
    return WorkerPlan(f"gpu{index}@{host}", "cuda:0", {"CUDA_VISIBLE_DEVICES": str(index)})


def count_gpus() -> int:
    """Visible NVIDIA GPUs, asked of nvidia-smi so the parent never initialises CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
