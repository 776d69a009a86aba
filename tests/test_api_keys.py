"""``farm api`` keys and per-key limits, through the real ``openai`` SDK and a real API process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis

from bench.api import ApiProcess
from protocol.names import model_queue
from tests.api_server import start_api
from tests.conftest import ROOT, RedisServer, WorkerProcess, wait_until

KEYS = ("alpha-key-1", "beta-key-22", "gamma-key-333")
"""alpha for plain calls, beta for the per-minute limit, gamma (from the keys file) in flight."""
RPM = 3


@pytest.fixture(scope="module")
def keyed_api(farm_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    workdir = tmp_path_factory.mktemp("api-keys")
    keys_file = workdir / "keys.txt"
    keys_file.write_text(f"# keys of the team\n{KEYS[2]}  # gamma\n\n")
    server = start_api(farm_worker.redis_url, workdir, "--access-log", api_keys=f"{KEYS[0]}, {KEYS[1]}",
                       api_keys_file=keys_file, api_key_rpm=RPM, api_key_concurrency=1)
    yield server
    server.close()


def sdk(server: ApiProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


def test_every_endpoint_but_health_needs_a_key(keyed_api: ApiProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(keyed_api, "wrong").completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert caught.value.code == "invalid_api_key"
    for path in ("/v1/models", "/metrics"):
        response = httpx.get(keyed_api.root + path)
        assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(keyed_api.root + "/health").status_code == 200
    assert [m.id for m in sdk(keyed_api, KEYS[0]).models.list()][0] == "tiny"
    assert sdk(keyed_api, KEYS[2]).completions.create(model="tiny", prompt="hi", max_tokens=2).choices


def test_a_key_over_its_requests_per_minute_gets_429(keyed_api: ApiProcess) -> None:
    beta = sdk(keyed_api, KEYS[1])
    for _ in range(RPM):
        beta.completions.create(model="tiny", prompt="per minute", max_tokens=2)
    with pytest.raises(openai.RateLimitError) as caught:
        beta.completions.create(model="tiny", prompt="per minute", max_tokens=2)
    assert caught.value.code == "rate_limit_exceeded" and "FARM_API_KEY_RPM" in caught.value.message
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 61
    assert sdk(keyed_api, KEYS[0]).completions.create(model="tiny", prompt="other key", max_tokens=2).choices


def test_a_key_over_its_concurrency_gets_429_until_its_request_ends(keyed_api: ApiProcess,
                                                                       farm_worker: WorkerProcess) -> None:
    gamma = sdk(keyed_api, KEYS[2])
    body = {"model": "tiny", "prompt": "long", "max_tokens": 8, "stream": True}
    headers = {"Authorization": f"Bearer {KEYS[2]}"}
    queue = redis.Redis.from_url(farm_worker.redis_url)
    os.kill(farm_worker.process.pid, signal.SIGSTOP)  # the held request waits in its queue: it cannot end
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(lambda: httpx.post(f"{keyed_api.base_url}/completions", json=body, headers=headers,
                                                  timeout=120).text)
            wait_until(lambda: queue.llen(model_queue("interactive", "tiny")) == 1, 30, "the held request was not sent")
            with pytest.raises(openai.RateLimitError) as caught:
                gamma.completions.create(model="tiny", prompt="second", max_tokens=2)
            os.kill(farm_worker.process.pid, signal.SIGCONT)
            assert "data: [DONE]" in held.result(timeout=120)
    finally:
        os.kill(farm_worker.process.pid, signal.SIGCONT)
    assert caught.value.code == "concurrency_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "1"
    wait_until(lambda: _succeeds(gamma), 30, "the key's slot was not released when its stream closed")


def _succeeds(client: openai.OpenAI) -> bool:
    try:
        return bool(client.completions.create(model="tiny", prompt="again", max_tokens=2).choices)
    except openai.RateLimitError:
        return False


def test_keys_never_reach_logs_metrics_or_redis(keyed_api: ApiProcess, redis_server: RedisServer) -> None:
    alpha = sdk(keyed_api, KEYS[0])
    alpha.completions.create(model="tiny", prompt="audit", max_tokens=2)
    metrics = httpx.get(keyed_api.root + "/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"}).text
    redis_names = b" ".join(redis_server.client().scan_iter(match="farm:api:*")).decode()
    assert "farm:api:" in redis_names and "POST /v1/completions" in keyed_api.log()
    for key in KEYS:
        assert key not in keyed_api.log() and key not in metrics and key not in redis_names


def test_refuses_to_listen_beyond_loopback_without_keys() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FARM_API_HOST": "0.0.0.0", "FARM_API_KEYS": ""}
    done = subprocess.run([sys.executable, "-m", "api.main"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "without keys: set FARM_API_KEYS" in done.stderr


def test_an_unreadable_keys_file_is_named(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FARM_API_KEYS_FILE": str(tmp_path / "missing")}
    done = subprocess.run([sys.executable, "-m", "api.main"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "FARM_API_KEYS_FILE=" in done.stderr and "cannot be read" in done.stderr
