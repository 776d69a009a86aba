"""A real ``farm api`` process for the API tests, started and stopped by PID."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.procs import free_port
from bench.procs import stop as stop_process
from tests.conftest import ROOT, wait_until


@dataclass
class ApiServer:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)


def start_api(redis_url: str, logdir: Path, *args: str, **settings: object) -> ApiServer:
    """``farm api`` on a free loopback port; returns once ``/health`` answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FARM_REDIS_URL": redis_url, "FARM_API_PORT": str(port)}
    env.update({f"FARM_{k.upper()}": str(v) for k, v in settings.items()})
    logdir.mkdir(parents=True, exist_ok=True)
    log_path = logdir / f"api-{port}-{int(time.time() * 1000)}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "api.main", "--log-level", "info", *args],
                                   env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    server = ApiServer(port, process, log_path)
    try:
        wait_until(lambda: process.poll() is not None or _answers(server), 60, "farm api did not start")
    except AssertionError:
        server.stop()
        raise
    if process.poll() is not None:
        raise AssertionError(f"farm api exited with {process.returncode}:\n{server.log()[-3000:]}")
    return server


def _answers(server: ApiServer) -> bool:
    try:
        return httpx.get(f"{server.root}/health", timeout=2).status_code in (200, 503)
    except httpx.HTTPError:
        return False
