"""``farm flower`` with basic auth: the API and the UI need the password, ``/metrics`` does not,
and the password never appears on Flower's command line."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import OUTPUT, ROOT, RedisServer, free_port, stop_process, wait_until

pytestmark = pytest.mark.integration


def status(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def test_flower_with_basic_auth(redis_server: RedisServer) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "FLOWER_"))}
    env.update({"PYTHONPATH": str(ROOT), "FARM_REDIS_URL": redis_server.url(0), "FARM_FLOWER_AUTH": "ops:fl0wer-pw"})
    log_path: Path = OUTPUT / "ops-flower.log"
    OUTPUT.mkdir(exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "ops.cli", "flower", "--port", str(port)], env=env, cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: status(f"{base}/metrics") == 200, 60, "Flower did not start")
        assert status(f"{base}/api/workers") == 401
        assert status(f"{base}/") == 401
        assert status(f"{base}/api/workers", "ops:wrong") == 401
        assert status(f"{base}/api/workers", "ops:fl0wer-pw") == 200
        with open(f"/proc/{process.pid}/cmdline", "rb") as f:
            assert b"fl0wer-pw" not in f.read()
    finally:
        stop_process(process)


def test_flower_logs_a_broker_url_without_password_as_it_is(redis_server: RedisServer) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "FLOWER_"))}
    env.update({"PYTHONPATH": str(ROOT), "FARM_REDIS_URL": redis_server.url(0)})
    log_path: Path = OUTPUT / "ops-flower-url.log"
    OUTPUT.mkdir(exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "ops.cli", "flower", "--port", str(port)], env=env, cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "Broker:" in log_path.read_text(errors="replace"), 60, "Flower did not start")
    finally:
        stop_process(process)
    text = log_path.read_text(errors="replace")
    assert f"Broker: {redis_server.url(0)}" in text and ":**@" not in text, text
