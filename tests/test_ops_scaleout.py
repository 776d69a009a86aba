"""Scale-out: workers on two "hosts" share one Redis; stopping one mid-job loses nothing.

Each host is a network namespace made here with ``ip netns`` and a veth pair to this machine,
with its own hostname (``unshare --uts``): a worker there reaches Redis only through the
network, at this machine's veth address, with the Redis password, exactly as a worker on
another machine would. Where namespaces are not permitted (not root), the hosts are plain
processes with distinct names on loopback; the test then says so in its artifact.

A job of 200 short rows goes to the ``bulk`` queue through ``FarmClient``; both workers take
part; host B gets SIGTERM in the middle of the job (a warm shutdown: it finishes what it holds,
its unstarted messages go back to the queue); every row still completes, each exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from producer.client import FarmClient
from protocol.names import executions_key, heartbeat_key
from tests.conftest import OUTPUT, ROOT, free_port, stop_process, wait_until

pytestmark = pytest.mark.integration

ROWS = 200
PASSWORD = "scale-out-pw"


@dataclass
class Host:
    name: str
    namespace: str | None
    redis_address: str
    """Where this host reaches Redis."""
    veth: str | None = None

    def wrap(self, cmd: list[str]) -> list[str]:
        """Run ``cmd`` on this host: in its namespace, under its own hostname (one exec chain, one pid)."""
        if self.namespace is None:
            return cmd
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "sh", "-c",
                f'hostname {self.name} && exec "$@"', "sh", *cmd]


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)


def _make_namespace_host(index: int, tag: str, subnet: int) -> Host:
    ns, outside, inside = f"farm{tag}h{index}", f"fv{tag}{index}o", f"fv{tag}{index}i"
    gateway, address = f"100.{subnet}.{index}.1", f"100.{subnet}.{index}.2"
    inner = ("netns", "exec", ns, "ip")
    steps = [("netns", "add", ns), ("link", "add", outside, "type", "veth", "peer", "name", inside),
             ("link", "set", inside, "netns", ns), ("addr", "add", f"{gateway}/30", "dev", outside),
             ("link", "set", outside, "up"), (*inner, "addr", "add", f"{address}/30", "dev", inside),
             (*inner, "link", "set", inside, "up"), (*inner, "link", "set", "lo", "up")]
    host = Host(f"host-{'ab'[index]}", ns, gateway, outside)
    for step in steps:
        done = _ip(*step)
        if done.returncode != 0:
            _remove_host(host)
            raise PermissionError(f"ip {' '.join(step)}: {done.stderr.strip()}")
    return host


def _remove_host(host: Host) -> None:
    if host.namespace:
        _ip("netns", "del", host.namespace)
    if host.veth:
        _ip("link", "del", host.veth)  # normally gone with the namespace


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Host]]:
    tag = str(os.getpid() % 100000)
    subnet = 64 + os.getpid() % 64  # 100.64.0.0/10: shared address space, not used on these machines
    made: list[Host] = []
    try:
        if shutil.which("ip") is None:
            raise PermissionError("no ip command")
        made = [_make_namespace_host(i, tag, subnet) for i in range(2)]
    except PermissionError as error:
        for host in made:
            _remove_host(host)
        print(f"network namespaces unavailable ({error}); hosts are processes on loopback")
        made = [Host("host-a", None, "127.0.0.1"), Host("host-b", None, "127.0.0.1")]
    yield made
    for host in made:
        _remove_host(host)


@dataclass
class SharedRedis:
    port: int
    process: subprocess.Popen[bytes]

    def url(self, address: str = "127.0.0.1") -> str:
        return f"redis://:{PASSWORD}@{address}:{self.port}/0"


@pytest.fixture(scope="module")
def shared_redis(hosts: list[Host], tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRedis]:
    """Redis on this machine, listening on loopback and on each host's link, with a password."""
    port, data = free_port(), tmp_path_factory.mktemp("shared-redis")
    binds = sorted({"127.0.0.1", *(h.redis_address for h in hosts)})
    config = f"port {port}\nbind {' '.join(binds)}\nrequirepass {PASSWORD}\nappendonly yes\ndir {data}\nsave \"\"\n"
    process = subprocess.Popen(["redis-server", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert process.stdin is not None
    process.stdin.write(config.encode())
    process.stdin.close()
    server = SharedRedis(port, process)
    wait_until(lambda: _pings(server.url()), 10, "redis-server did not start")
    yield server
    stop_process(process)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@dataclass
class RemoteWorker:
    name: str
    host: Host
    process: subprocess.Popen[bytes]
    log_path: Path


def start_remote_worker(host: Host, server: SharedRedis, model: Path, logdir: Path) -> RemoteWorker:
    name = f"cpu@{host.name}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update({"PYTHONPATH": str(ROOT), "FARM_REDIS_URL": server.url(host.redis_address), "FARM_MODEL": str(model),
                "FARM_WORKER_NAME": name, "FARM_HEARTBEAT_SECONDS": "0.5", "FARM_COUNT_EXECUTIONS": "1",
                "FARM_MAX_BATCH_SIZE": "4", "FARM_MAX_INFLIGHT": "8", "FARM_MAX_WAIT_MS": "5"})
    logdir.mkdir(parents=True, exist_ok=True)
    log_path = logdir / f"scaleout-{host.name}-{int(time.time())}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(host.wrap([sys.executable, "-m", "worker.main", "--device", "cpu"]), env=env,
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return RemoteWorker(name, host, process, log_path)


@pytest.fixture(scope="module")
def remote_workers(hosts: list[Host], shared_redis: SharedRedis, tiny_model: Path) -> Iterator[list[RemoteWorker]]:
    logdir = OUTPUT / "scaleout"
    started = [start_remote_worker(h, shared_redis, tiny_model, logdir) for h in hosts]
    local = redis.Redis.from_url(shared_redis.url())
    try:
        for w in started:
            wait_until(lambda w=w: w.process.poll() is not None or local.exists(heartbeat_key(w.name)), 120,
                       f"worker on {w.host.name} not ready")
            assert w.process.poll() is None, w.log_path.read_text()[-3000:]
        yield started
    finally:
        for w in started:
            stop_process(w.process)


def test_a_host_reaches_redis_only_over_its_link(hosts: list[Host], shared_redis: SharedRedis) -> None:
    if hosts[0].namespace is None:
        assert hosts[0].redis_address == "127.0.0.1"  # process mode: nothing more to show
        return
    probe = ("import socket, sys\n"
             "def reach(a):\n"
             "    try:\n"
             f"        socket.create_connection((a, {shared_redis.port}), timeout=2).close(); return 1\n"
             "    except OSError:\n"
             "        return 0\n"
             f"print(socket.gethostname(), reach('127.0.0.1'), reach('{hosts[0].redis_address}'))")
    out = subprocess.run(hosts[0].wrap([sys.executable, "-c", probe]), capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == [hosts[0].name, "0", "1"], out.stderr


def test_job_spreads_over_two_hosts_and_survives_stopping_one(remote_workers: list[RemoteWorker],
                                                              shared_redis: SharedRedis) -> None:
    a, b = remote_workers
    client = FarmClient(shared_redis.url())
    local = redis.Redis.from_url(shared_redis.url())
    beats = {w["name"]: w for w in client.workers()}
    assert {beats[a.name]["host"], beats[b.name]["host"]} == ({a.host.name, b.host.name} if a.host.namespace
                                                              else {beats[a.name]["host"]})
    job = f"scaleout{int(time.time())}"
    handles = [client.submit(f"row {i}: the farm on two hosts", queue="bulk", request_id=f"{job}:{i}",
                             max_new_tokens=48, ignore_eos=True) for i in range(ROWS)]

    def b_took_part() -> bool:
        record = local.get(heartbeat_key(b.name))
        return record is not None and json.loads(record)["requests"] >= 8

    wait_until(b_took_part, 120, "host B took no rows")
    b.process.send_signal(signal.SIGTERM)  # mid-job: B finishes what it holds, the rest goes back
    done_at_stop = sum(1 for v in local.mget([f"celery-task-meta-{h.id}" for h in handles]) if v)
    assert b.process.wait(60) == 0, b.log_path.read_text()[-3000:]
    results = [h.result(timeout=180) for h in handles]
    by_worker = {name: sum(1 for r in results if r.worker == name) for name in (a.name, b.name)}
    executions = {k.decode(): int(v) for k, v in local.hgetall(executions_key()).items()}
    report = {"mode": "netns" if a.host.namespace else "processes", "rows": ROWS, "done_when_b_stopped": done_at_stop,
              "rows_by_worker": by_worker, "executions_over_1": sum(1 for h in handles if executions[h.id] > 1)}
    (OUTPUT / "scaleout").mkdir(parents=True, exist_ok=True)
    (OUTPUT / "scaleout" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(report)
    assert done_at_stop < ROWS, "the job ended before host B was stopped: make it longer"
    assert all(r.ok and r.completion_tokens == 48 for r in results)
    assert by_worker[a.name] > 0 and by_worker[b.name] > 0 and sum(by_worker.values()) == ROWS
    assert all(executions.get(h.id) == 1 for h in handles), "a row ran twice or never"
    assert local.get(heartbeat_key(b.name)) is None  # B said goodbye
