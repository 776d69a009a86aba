"""Acceptance of ``farm up``: the whole farm from one command, on free ports with its own Redis.

``farm up --model-size tiny`` builds (or finds) the tiny embedded model, starts a password-protected
Redis, a CPU worker, Flower and the UI; the tests generate through the UI's API and through
``FarmClient``, read ``/metrics`` from Flower and the worker, read ``farm status``, kill the
worker to see it restarted, and finally send SIGTERM and check that every process it started
is gone.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from producer.client import FarmClient
from tests.ui_server import DEFAULTS
from tests.conftest import OUTPUT, ROOT, free_port, stop_process, wait_until

pytestmark = pytest.mark.integration

HOST = socket.gethostname()
WORKER = f"cpu@{HOST}"


@dataclass
class FarmUp:
    process: subprocess.Popen[bytes]
    log_path: Path
    redis_url: str
    ui_port: int
    flower_port: int
    metrics_port: int
    env: dict[str, str]
    started: dict[int, tuple[str, str]] = field(default_factory=dict)
    """Every descendant seen while the farm ran: pid -> (start time, command line)."""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def farm_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if line.startswith("[farm] ")]

    def record_descendants(self) -> dict[int, tuple[str, str]]:
        found = descendants(self.process.pid)
        self.started.update(found)
        return found


def _proc_stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, start time, state) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[1]), fields[19], fields[0]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except FileNotFoundError:
        return ""


def descendants(root: int) -> dict[int, tuple[str, str]]:
    """Every live process below ``root``: pid -> (start time, command line)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            parents.setdefault(stat[0], []).append(int(entry))
    found: dict[int, tuple[str, str]] = {}
    todo = list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        stat = _proc_stat(pid)
        if stat is not None:
            found[pid] = (stat[1], _cmdline(pid))
            todo.extend(parents.get(pid, []))
    return found


def still_running(pid: int, start_time: str) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[1] == start_time and stat[2] != "Z"


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return 0, ""


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples (any labels) in a Prometheus text page."""
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    assert values, f"{name} not in metrics"
    return sum(values)


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarmUp]:
    out = OUTPUT / "ops-up"
    out.mkdir(parents=True, exist_ok=True)
    redis_port, ui_port, flower_port, metrics_port = (free_port() for _ in range(4))
    redis_url = f"redis://:up-test-pw@127.0.0.1:{redis_port}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update({"PYTHONPATH": str(ROOT), "FARM_REDIS_URL": redis_url, "FARM_HEARTBEAT_SECONDS": "0.5"})
    cmd = [sys.executable, "-m", "ops.cli", "up", "--model-size", "tiny", "--gpus", "none",
           "--ui-port", str(ui_port), "--flower-port", str(flower_port), "--metrics-port", str(metrics_port),
           "--data-dir", str(tmp_path_factory.mktemp("farm-data"))]
    log_path = out / f"farm-up-{int(time.time())}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    farm = FarmUp(process, log_path, redis_url, ui_port, flower_port, metrics_port, env)
    try:
        wait_until(lambda: process.poll() is not None or "[farm] ready:" in farm.log(), 240, "farm up not ready")
        assert process.poll() is None, farm.log()[-4000:]
        farm.record_descendants()
        yield farm
    finally:
        stop_process(process, timeout=90)
        for pid, (start, _) in farm.started.items():  # never leave anything behind, even on failure
            if still_running(pid, start):
                os.kill(pid, signal.SIGKILL)


def test_prints_urls_with_passwords_redacted(farm: FarmUp) -> None:
    lines = "\n".join(farm.farm_lines())
    assert re.search(r"Redis +redis://:\*\*\*@127\.0\.0\.1:\d+/0", lines)
    assert f"http://127.0.0.1:{farm.flower_port}" in lines
    assert f"http://127.0.0.1:{farm.ui_port}" in lines
    assert f"http://127.0.0.1:{farm.metrics_port}/metrics ({WORKER})" in lines
    assert "up-test-pw" not in farm.log()
    assert f"[{WORKER}] " in farm.log()  # the children's logs, prefixed


def test_started_redis_worker_flower_and_ui(farm: FarmUp) -> None:
    commands = [cmd for _, cmd in farm.record_descendants().values()]
    assert any(cmd.startswith("redis-server") for cmd in commands), commands
    assert any("worker.main --device cpu --in-process" in cmd for cmd in commands), commands
    assert any("ops.flower" in cmd for cmd in commands), commands
    assert any("ui.app" in cmd for cmd in commands), commands
    assert not any("up-test-pw" in cmd for cmd in commands)  # no password on a command line


def test_generates_through_the_ui_api_and_farm_client(farm: FarmUp) -> None:
    from gradio_client import Client

    client = FarmClient(farm.redis_url)
    result = client.generate("The farm answers", max_new_tokens=12, ignore_eos=True, timeout=60)
    assert result.ok and result.completion_tokens == 12 and result.worker == WORKER
    ui_url = f"http://127.0.0.1:{farm.ui_port}/"
    wait_until(lambda: http_get(ui_url)[0] == 200, 90, "the UI did not answer")
    ui = Client(ui_url, verbose=False, download_files=False)
    status, text, request_id = ui.predict("The farm answers", *{**DEFAULTS, "new_tokens": 12}.values(),
                                          api_name="/generate")
    stored = client.handle(request_id).result(timeout=30)
    assert stored.ok and stored.worker == WORKER and text == stored.text
    assert text == client.generate("The farm answers", max_new_tokens=12, timeout=60).text  # greedy: same text


def test_metrics_from_flower_and_the_worker(farm: FarmUp) -> None:
    client = FarmClient(farm.redis_url)
    handles = [client.submit(f"metrics row {i}", max_new_tokens=6, ignore_eos=True, queue="bulk") for i in range(6)]
    assert all(h.result(timeout=60).ok for h in handles)
    code, worker_page = http_get(f"http://127.0.0.1:{farm.metrics_port}/metrics")
    assert code == 200
    assert metric(worker_page, "farm_generated_tokens_total") >= 36
    assert metric(worker_page, "farm_batch_size_count") >= 1
    assert metric(worker_page, "farm_batch_size_sum") >= 6
    assert metric(worker_page, "farm_time_to_first_token_seconds_count") >= 6
    assert metric(worker_page, "farm_requests_in_flight") >= 0

    def none_in_flight() -> bool:  # task_postrun runs just after the result is stored
        return metric(http_get(f"http://127.0.0.1:{farm.metrics_port}/metrics")[1], "farm_requests_in_flight") == 0

    wait_until(none_in_flight, 10, "requests still in flight")
    assert f'name="{WORKER}"' in worker_page and 'device="cpu"' in worker_page

    def heartbeat_has_latencies() -> bool:
        record = {w["name"]: w for w in client.workers()}[WORKER]
        return record.get("first_token_seconds") is not None and record.get("decode_seconds_per_token") is not None

    wait_until(heartbeat_has_latencies, 10, "the heartbeat carries no latency summary")

    def flower_saw_tasks() -> bool:
        code, page = http_get(f"http://127.0.0.1:{farm.flower_port}/metrics")
        return code == 200 and 'type="task-succeeded"' in page and f'worker="{WORKER}"' in page

    wait_until(flower_saw_tasks, 30, "Flower's /metrics did not count the tasks")
    code, workers = http_get(f"http://127.0.0.1:{farm.flower_port}/api/workers?refresh=1")
    assert code == 200 and WORKER in workers  # loopback without auth: the API is open


def test_farm_status_shows_the_running_farm(farm: FarmUp) -> None:
    env = {**farm.env, "COLUMNS": "220"}
    out = subprocess.run([sys.executable, "-m", "ops.cli", "status"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for part in ("reachable", "Workers online: 1", WORKER, "cpu", "tiny", "ready", "interactive", "bulk",
                 "1st token", str(farm.metrics_port)):
        assert part in out.stdout, (part, out.stdout)
    assert "up-test-pw" not in out.stdout


def test_dead_worker_is_restarted(farm: FarmUp) -> None:
    client = FarmClient(farm.redis_url)
    before = {w["name"]: w for w in client.workers()}[WORKER]
    os.kill(int(before["pid"]), signal.SIGKILL)
    wait_until(lambda: f"{WORKER} exited with code -9; restarting in 1s" in farm.log(), 30, "death not reported")

    def restarted() -> bool:
        now = {w["name"]: w for w in client.workers()}.get(WORKER)
        return now is not None and now["pid"] != before["pid"] and bool(now.get("ready"))

    wait_until(restarted, 120, "the worker was not restarted")
    farm.record_descendants()
    assert client.generate("after the restart", max_new_tokens=4, timeout=60).ok


def test_sigterm_stops_every_child_in_order(farm: FarmUp) -> None:
    seen = {**farm.started, **farm.record_descendants()}
    assert len(seen) >= 4
    farm.process.send_signal(signal.SIGTERM)
    assert farm.process.wait(90) == 0
    lines = farm.farm_lines()
    order = [next(i for i, line in enumerate(lines) if line == f"[farm] stopped {name}")
             for name in ("ui", "flower", WORKER, "redis")]
    assert order == sorted(order), lines[-10:]
    alive = {pid: cmd for pid, (start, cmd) in seen.items() if still_running(pid, start)}
    assert not alive, alive


def _refused(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    base.update({"PYTHONPATH": str(ROOT), "FARM_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", **env})
    return subprocess.run([sys.executable, "-m", "ops.cli", "up", "--model-size", "tiny", "--gpus", "none", *args],
                          env=base, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_exposed_flower_without_auth_is_refused_before_anything_starts() -> None:
    out = _refused(["--host", "0.0.0.0", "--no-ui", "--flower-port", str(free_port()),
                    "--metrics-port", str(free_port())])
    assert out.returncode == 1
    assert "[farm] error: Flower would listen on 0.0.0.0 without a password" in out.stdout
    assert "started" not in out.stdout


def test_a_taken_port_is_refused_naming_the_option() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _refused(["--no-ui", "--flower-port", str(port), "--metrics-port", str(free_port())])
    assert out.returncode == 1
    assert f"Flower cannot listen on 127.0.0.1:{port}" in out.stdout and "--flower-port" in out.stdout
    assert "started" not in out.stdout


def test_status_says_in_one_line_when_redis_is_unreachable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update({"PYTHONPATH": str(ROOT), "FARM_REDIS_URL": f"redis://:hidden@127.0.0.1:{free_port()}/0"})
    out = subprocess.run([sys.executable, "-m", "ops.cli", "status"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("farm status: Redis at redis://:***@127.0.0.1:"), out.stderr
    assert "unreachable" in lines[0] and "hidden" not in lines[0]
