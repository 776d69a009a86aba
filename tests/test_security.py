"""Redis with a password end to end (worker and client), and the password never shown."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from producer import FarmClient
from protocol.errors import FarmUnavailable
from tests.conftest import start_redis, start_worker

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-Pa55word"


def test_password_protected_redis_end_to_end(tiny_model: Path, tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis", password=PASSWORD)
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).set("x", 1)
        worker = start_worker(server.url(), tiny_model, tmp_path / "logs", name="secure@test")
        try:
            result = FarmClient(server.url()).generate("locked", max_new_tokens=4, timeout=60)
            assert result.ok and result.worker == "secure@test"
        finally:
            worker.stop()
        assert PASSWORD not in worker.log()
        wrong = FarmClient(server.url().replace(PASSWORD, "wrong"))
        with pytest.raises(FarmUnavailable) as refused:
            wrong.ping()
        assert PASSWORD not in str(refused.value) and "wrong" not in str(refused.value)
    finally:
        server.stop()
