"""A real worker serving the demo model (SmolLM2-135M-Instruct and its adapters, the session's
``demo_model`` fixture), for the modules that ask it questions. One per module, on the module's
own database."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ops.model_cache import served_adapters
from tests.conftest import RedisServer, WorkerProcess, start_worker


def module_demo_worker(db: str, name: str = "demo@test", **settings: object) -> Callable[..., Iterator[WorkerProcess]]:
    """A module's ``demo_worker`` fixture: the demo model with its adapters on ``db``."""

    @pytest.fixture(scope="module")
    def demo_worker(redis_server: RedisServer, demo_model: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
        adapters = served_adapters(demo_model)["FARM_ADAPTERS"]
        redis_server.client(db).flushdb()
        worker = start_worker(redis_server.url(db), demo_model, tmp_path_factory.mktemp("demo-worker"), name=name,
                              adapters=adapters, **settings)
        yield worker
        worker.stop()

    return demo_worker

