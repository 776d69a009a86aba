"""Pure parts of ``ops/`` and the worker metrics: planning, auth rules, backoff, supervision of
real (tiny, non-model) child processes, metrics observed from results."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from rich.console import Console

from ops.flower import check_auth, flower_env, is_loopback
from ops.status import render
from ops.supervise import ChildSpec, Output, Supervisor, backoff_delay
from ops.up import FarmUpError, plan_gpus, redis_spec, worker_specs
from protocol.errors import SettingsError
from protocol.heartbeat import WorkerHeartbeat
from protocol.schema import GenerationResult
from tests.conftest import wait_until
from worker.metrics import MeteredSink, WorkerMetrics


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "", "10.1.2.3", "example.org", "::"])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback(host)


def test_flower_refuses_to_listen_beyond_loopback_without_auth() -> None:
    with pytest.raises(SettingsError, match="FARM_FLOWER_AUTH"):
        check_auth("0.0.0.0", "")
    with pytest.raises(SettingsError, match="user:password"):
        check_auth("0.0.0.0", "admin")
    check_auth("0.0.0.0", "admin:secret")
    check_auth("127.0.0.1", "")


def test_flower_api_is_open_only_without_auth_on_loopback() -> None:
    assert flower_env("127.0.0.1", "") == {"FLOWER_UNAUTHENTICATED_API": "true"}
    assert flower_env("0.0.0.0", "a:b") == {"FLOWER_BASIC_AUTH": "a:b"}


def test_gpus_option_plans_one_worker_per_device() -> None:
    assert [(p.name, p.device, p.env) for p in plan_gpus("none", 2, "h")] == [
        ("cpu@h", "cpu", {"CUDA_VISIBLE_DEVICES": ""})]
    assert [p.name for p in plan_gpus("all", 0, "h")] == ["cpu@h"]
    assert [(p.name, p.env["CUDA_VISIBLE_DEVICES"]) for p in plan_gpus("all", 2, "h")] == [("gpu0@h", "0"),
                                                                                        ("gpu1@h", "1")]
    assert [(p.name, p.device) for p in plan_gpus("1,0,1", 2, "h")] == [("gpu1@h", "cuda:0"), ("gpu0@h", "cuda:0")]
    with pytest.raises(FarmUpError, match="only 2 GPU"):
        plan_gpus("0,2", 2, "h")
    with pytest.raises(FarmUpError, match="all, none"):
        plan_gpus("first", 2, "h")


def test_worker_specs_get_their_own_name_device_and_metrics_port() -> None:
    specs = worker_specs(plan_gpus("all", 2, "h"), {"FARM_MODEL": "m"}, 9400, "info")
    assert [s.name for s in specs] == ["gpu0@h", "gpu1@h"]
    assert [s.env["FARM_METRICS_PORT"] for s in specs] == ["9400", "9401"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "1"]
    assert all(s.restart and s.env["FARM_MODEL"] == "m" for s in specs)
    assert specs[1].cmd[1:] == ["-m", "worker.main", "--device", "cuda:0", "--in-process", "--loglevel", "info"]
    named = worker_specs(plan_gpus("none", 0, "h"), {"FARM_WORKER_NAME": "cpu@box"}, 0, "info")
    assert named[0].name == "cpu@box" and named[0].env["FARM_METRICS_PORT"] == "0"


def test_redis_config_goes_on_stdin_not_the_command_line(tmp_path: Path) -> None:
    spec = redis_spec("redis://:s3cret@127.0.0.1:6390/2", tmp_path)
    assert spec.cmd == ["redis-server", "-"]
    assert spec.stdin is not None
    config = spec.stdin.decode().splitlines()
    assert {"port 6390", "bind 127.0.0.1", "appendonly yes", "requirepass s3cret", f"dir {tmp_path}"} <= set(config)
    assert "s3cret" not in " ".join(spec.cmd)


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_supervisor_restarts_with_backoff_and_reports_other_deaths() -> None:
    stream = io.StringIO()
    supervisor = Supervisor(Output(stream))
    crashing = supervisor.start(ChildSpec("crash", _python("print('bye'); raise SystemExit(3)"), dict(os.environ),
                                          restart=True))
    supervisor.start(ChildSpec("once", _python("raise SystemExit(5)"), dict(os.environ)))
    wait_until(lambda: crashing.process is not None and crashing.process.poll() is not None, 20, "child did not exit")
    time.sleep(0.3)
    now = time.monotonic()
    assert {c.name for c in supervisor.poll(now)} == {"crash", "once"}
    assert crashing.restart_at == pytest.approx(now + 1)
    first_pid = crashing.pid
    supervisor.poll(now + 0.5)
    assert crashing.pid == first_pid  # not yet: backoff
    supervisor.poll(now + 1.01)
    assert crashing.pid != first_pid
    supervisor.stop([["crash"]])
    text = stream.getvalue()
    assert "[crash] bye" in text
    assert "crash exited with code 3; restarting in 1s" in text
    assert "once exited with code 5; not restarted" in text


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A child's own children go too, even one that ignores SIGTERM."""
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    supervisor = Supervisor(Output(io.StringIO()))
    child = supervisor.start(ChildSpec("parent", _python(code), dict(os.environ), stop_timeout=5))
    wait_until(lambda: pidfile.exists() and pidfile.read_text(), 20, "grandchild did not start")
    grandchild = int(pidfile.read_text())
    supervisor.stop([["parent"]])
    assert child.process is not None and child.process.poll() is not None
    wait_until(lambda: not _alive(grandchild), 10, "grandchild survived")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_metered_sink_observes_batches_and_results() -> None:
    class Inner:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def begin(self, request_ids: list[str], worker: str, batch_size: int) -> None:
            self.calls.append("begin")

        def on_step(self, deltas: dict[str, str], finished: list[str]) -> set[str]:
            return set()

        def end(self, result: GenerationResult) -> None:
            self.calls.append("end")

        def cancelled(self, request_ids: list[str]) -> set[str]:
            return set()

        def count_execution(self, request_ids: list[str]) -> None:
            pass

    metrics, inner = WorkerMetrics(), Inner()
    sink = MeteredSink(inner, metrics)
    sink.begin(["a", "b"], "w", 2)
    sink.end(GenerationResult(id="a", completion_tokens=11, prompt_tokens=5, batch_size=2, queue_seconds=0.2,
                              generate_seconds=1.5, first_token_seconds=0.5))
    text = generate_latest(metrics.registry).decode()
    assert inner.calls == ["begin", "end"]
    assert "farm_batch_size_sum 2.0" in text
    assert "farm_generated_tokens_total 11.0" in text
    assert 'farm_requests_total{finish_reason="length"} 1.0' in text
    assert "farm_time_to_first_token_seconds_sum 0.5" in text
    assert "farm_decode_seconds_per_token_sum 0.1" in text  # (1.5 - 0.5) / 10 tokens
    assert "farm_queue_wait_seconds_count 1.0" in text
    metrics.task_started()
    assert metrics.summary() == {"in_flight": 1, "queue_wait_seconds": 0.2, "first_token_seconds": 0.5,
                                 "decode_seconds_per_token": pytest.approx(0.1)}


def test_status_screen_shows_workers_and_queues() -> None:
    console = Console(file=io.StringIO(), width=200)
    worker = {"name": "gpu1@box", "host": "box", "device": "cuda:0", "cuda_visible_devices": "1",
              "model": "/models/demo", "quant": "int8", "ready": True, "batches": 3, "requests": 40,
              "mean_batch_size": 13.3, "tokens_per_second": 95.5, "running": 8, "waiting": 2,
              "updated_at": time.time(), "metrics_port": 9401, "queue_wait_seconds": 0.25,
              "first_token_seconds": 0.125, "decode_seconds_per_token": 0.0125}
    render({"redis": "redis://:***@h:6379/0", "workers": [WorkerHeartbeat.from_dict(worker)],
            "queues": {"interactive": 0, "bulk": 7}},
           console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for part in ("Workers online: 1", "gpu1@box", "cuda:0 (GPU 1)", "demo", "int8", "ready", "13.3", "95.5",
                 "8/2", "9401", "bulk", "7", "redis://:***@h:6379/0", "0.25s", "0.12s", "12.5"):
        assert part in text, part


def test_printed_urls_hide_passwords(tmp_path: Path) -> None:
    from ops.up import UpOptions, urls
    from protocol.settings import FarmSettings

    settings = FarmSettings(redis_url="redis://:r3dis@127.0.0.1:6400/0", flower_auth="admin:fl0wer")
    opts = UpOptions("none", "tiny", "127.0.0.1", True, 7861, 5556, 9500, tmp_path, 60.0, "info")
    shown = dict((label, url) for label, url in urls(opts, settings, worker_specs(plan_gpus("none", 0, "h"), {}, 9500,
                                                                                   "info"), ui=True))
    assert shown == {"Redis": "redis://:***@127.0.0.1:6400/0", "Flower": "http://127.0.0.1:5556 (login admin:***)",
                     "UI": "http://127.0.0.1:7861", "metrics": "http://127.0.0.1:9500/metrics (cpu@h)"}
