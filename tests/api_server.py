"""A real ``farm api`` process for the API tests (``bench.api.ApiProcess``, stopped by PID)."""

from __future__ import annotations

from pathlib import Path

from bench.api import ApiProcess


def start_api(redis_url: str, logdir: Path, *args: str, **settings: object) -> ApiProcess:
    """``farm api`` (log level info) on a free loopback port; returns once ``/health`` answers."""
    return ApiProcess(redis_url, logdir, "--log-level", "info", *args, **settings)
