"""``farm flower`` with basic auth: the API and the UI need the password, ``/metrics`` does not,
and the password never appears on Flower's command line; started as ``farm up`` starts it, before
and after a real worker, it logs no "Inspect method … failed"."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ops.flower import NO_WORKER_YET
from ops.up import flower_spec
from tests.conftest import OUTPUT, ROOT, RedisServer, free_port, start_worker, stop_process, wait_until

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


def start_flower_as_farm_up_does(redis_url: str, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Flower from ``ops.up.flower_spec``, the command and environment ``farm up`` gives it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "FLOWER_"))}
    env.update({"PYTHONPATH": str(ROOT), "FARM_REDIS_URL": redis_url})
    spec = flower_spec(env, "127.0.0.1", port)
    OUTPUT.mkdir(exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(spec.cmd, env=spec.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def inspected(base: str, worker: str) -> dict[str, object]:
    """What Flower's inspect broadcasts (``?refresh=1`` sends them again) learnt of ``worker``."""
    try:
        with urllib.request.urlopen(f"{base}/api/workers?refresh=1", timeout=10) as reply:
            return dict(json.loads(reply.read()).get(worker) or {})
    except OSError:
        return {}


def test_flower_started_as_farm_up_does_logs_no_failed_inspect(redis_server: RedisServer, tiny_model: Path,
                                                               tmp_path: Path) -> None:
    """``farm up`` starts Flower while its workers load: the startup inspect finds nobody (one
    plain line, not four warnings). A worker online then answers every inspect method, ``stats``
    included (its reply holds the broker's transport options, once unencodable), before and after
    a Flower started once it is up."""
    url = redis_server.url("ops-flower-inspect")
    early_log, late_log = OUTPUT / "ops-flower-early.log", OUTPUT / "ops-flower-late.log"
    early, early_base = start_flower_as_farm_up_does(url, early_log)
    worker = late = None
    try:
        wait_until(lambda: NO_WORKER_YET in early_log.read_text(errors="replace")
                   or "Inspect method" in early_log.read_text(errors="replace"), 60, "Flower's startup inspect")
        worker = start_worker(url, tiny_model, tmp_path, name="cpu@ops-flower")
        late, late_base = start_flower_as_farm_up_does(url, late_log)
        methods = {"stats", "active_queues", "registered", "conf"}
        for base in (early_base, late_base):
            wait_until(lambda b=base: methods <= set(inspected(b, worker.name)), 60,  # type: ignore[union-attr]
                       f"Flower at {base} did not inspect the worker")
    finally:
        for process in (late, early):
            if process is not None:
                stop_process(process)
        if worker is not None:
            worker.stop()
    for log_path in (early_log, late_log):
        text = log_path.read_text(errors="replace")
        assert "Inspect method" not in text and "inspection failed" not in text, text
    assert NO_WORKER_YET in early_log.read_text(errors="replace")
    assert "Control command error" not in worker.log(), worker.log()[-3000:]
