"""Messages written straight to the Redis queue, bypassing the client: each is rejected with a log
line, never deserialized with pickle, and the worker stays up and keeps serving."""

from __future__ import annotations

import base64
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer import FarmClient
from protocol.names import INTERACTIVE_QUEUE
from tests.conftest import RedisServer, WorkerProcess, start_worker, wait_until

pytestmark = pytest.mark.integration

PICKLE_MARKER = Path("/tmp/batchfarm-pickle-was-executed")


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (PICKLE_MARKER.touch, ())  # type: ignore[return-value]


def envelope(body: bytes, content_type: str = "application/json", task_id: str = "x",
             task: str = "batchfarm.generate") -> bytes:
    """A kombu Redis message as Celery writes it, with our own body and content type."""
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "utf-8", "content-type": content_type,
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0,
                    "timelimit": [None, None], "argsrepr": "()", "kwargsrepr": "{}"},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": INTERACTIVE_QUEUE},
                       "delivery_tag": f"tag-{task_id}"},
    }).encode()


def celery_body(request: object) -> bytes:
    return json.dumps([[], {"request": request}, {"callbacks": None, "errbacks": None, "chain": None,
                                                  "chord": None}]).encode()


@pytest.fixture(scope="module")
def hostile_worker(redis_server: RedisServer, tiny_model: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    worker = start_worker(redis_server.url("hostile"), tiny_model, tmp_path_factory.mktemp("hostile"),
                          name="hostile@test")
    yield worker
    worker.stop()


def test_hostile_messages_are_rejected_and_worker_keeps_serving(hostile_worker: WorkerProcess) -> None:
    client = FarmClient(hostile_worker.redis_url)
    PICKLE_MARKER.unlink(missing_ok=True)
    hostile = [
        envelope(pickle.dumps([[], {"request": _Exploit()}, {}]), "application/x-python-serialize", "pickled"),
        b"{this is not json",
        json.dumps({"body": "bm90IGpzb24="}).encode(),  # an envelope missing every other field
        envelope(b"not json at all", task_id="badbody"),
        envelope(celery_body({"prompt": "x" * 5_000_000}), task_id="huge"),
        envelope(celery_body({"prompt": "hi"}), task_id="unknown-task", task="os.system"),
    ]
    for raw in hostile:
        client.redis.lpush(INTERACTIVE_QUEUE, raw)
    result = client.generate("still serving", max_new_tokens=4, timeout=60)
    assert result.ok and result.worker == "hostile@test"
    wait_until(lambda: client.redis.llen(INTERACTIVE_QUEUE) == 0, 30, "hostile messages were not consumed")
    assert hostile_worker.process.poll() is None
    assert not PICKLE_MARKER.exists(), "a pickle payload was deserialized"
    huge = client.handle("huge").result(timeout=30)
    assert huge.error and huge.error["code"] == "prompt_too_long"
    log = hostile_worker.log()
    assert "pickle" in log.lower() or "untrusted" in log.lower() or "content" in log.lower()
    assert "unknown-task" in log or "os.system" in log
    assert client.generate("and again", max_new_tokens=4, timeout=60).ok
