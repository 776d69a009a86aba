"""Processes the benchmark starts (redis-server, a worker, transformers serve) and stops, by PID."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it does not stop."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGCONT)  # a process stopped by a Fleet would not see the SIGTERM
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private, non-persistent redis-server on loopback; returns it and its URL."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(workdir), "--logfile", str(workdir / "redis.log")]
    process = subprocess.Popen(cmd)
    url = f"redis://127.0.0.1:{port}/0"
    wait_for(lambda: _pings(url), 10, "redis-server did not start")
    return process, url


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.RedisError:
        return False


def wait_for(predicate: object, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise RuntimeError(f"{message} (after {timeout}s)")


class Fleet:
    """The servers one model's run started, by mode. While a mode runs N clients the others'
    processes are stopped (SIGSTOP) and continued after: idle, they still wake for heartbeats and
    polls (a farm worker ~3 % of a core), and on two cores every wake-up that preempts one of a
    model's two compute threads stalls the other at its next barrier. At one client the modes take
    turns request by request, all running."""

    def __init__(self) -> None:
        self.processes: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.ready: dict[str, Callable[[], bool]] = {}

    def add(self, mode: str, processes: list[subprocess.Popen[bytes]], ready: Callable[[], bool] | None = None) -> None:
        """``ready``: whether the mode serves again after it was continued (a heartbeat written)."""
        self.processes.setdefault(mode, []).extend(processes)
        if ready is not None:
            self.ready[mode] = ready

    def serve(self, mode: str, serve: Callable[[Any, int], Any]) -> Callable[[Any, int], Any]:
        """``serve(jobs, concurrency)``, with the others stopped when concurrency > 1."""

        def run(jobs: Any, concurrency: int) -> Any:
            if concurrency <= 1:
                return serve(jobs, concurrency)
            with self.alone(mode):
                return serve(jobs, concurrency)

        return run

    @contextlib.contextmanager
    def alone(self, mode: str) -> Iterator[None]:
        others = [p for name, group in self.processes.items() if name != mode for p in group if p.poll() is None]
        stopped: list[subprocess.Popen[bytes]] = []
        try:
            for process in others:
                process.send_signal(signal.SIGSTOP)
                stopped.append(process)
            if mode in self.ready:
                wait_for(self.ready[mode], 60, f"{mode} did not serve again after it was continued")
            yield
        finally:
            for process in stopped:
                if process.poll() is None:
                    process.send_signal(signal.SIGCONT)
