"""A real ``farm api`` process for the API tests (``bench.api.ApiProcess``, stopped by PID)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from bench.api import ApiProcess


def start_api(redis_url: str, logdir: Path, *args: str, **settings: object) -> ApiProcess:
    """``farm api`` (log level info) on a free loopback port; returns once ``/health`` answers."""
    return ApiProcess(redis_url, logdir, "--log-level", "info", *args, **settings)


def module_api_server(tag: str) -> Callable[..., Iterator[ApiProcess]]:
    """A module's ``api_server`` fixture: one ``farm api`` on the shared worker's Redis."""

    @pytest.fixture(scope="module")
    def api_server(farm_worker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
        server = start_api(farm_worker.redis_url, tmp_path_factory.mktemp(tag))
        yield server
        server.close()

    return api_server


def sdk_client(server: ApiProcess) -> openai.OpenAI:
    """The real ``openai`` SDK pointed at ``server`` (no retries: each error is seen as it is)."""
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
