"""Workers on other "hosts" for tests (the scale-out and the partition tests): each host is a
network namespace made with ``ip netns`` and a veth pair to this machine, with its own hostname
(``unshare --uts``); a worker there reaches Redis only through the network, at this machine's
veth address, with the Redis password, exactly as a worker on another machine would. Where
namespaces are not permitted (not root), the hosts are plain processes with distinct names on
loopback (``Host.namespace`` is None); tests say so in their artifacts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.conftest import ROOT, free_port, stop_process, wait_until

PASSWORD = "scale-out-pw"


@dataclass
class Host:
    name: str
    namespace: str | None
    redis_address: str
    """Where this host reaches Redis."""
    veth: str | None = None
    """This machine's end of the host's link (``ip link set <veth> down`` cuts the host off)."""

    def wrap(self, cmd: list[str]) -> list[str]:
        """Run ``cmd`` on this host: in its namespace, under its own hostname (one exec chain, one pid)."""
        if self.namespace is None:
            return cmd
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "sh", "-c",
                f'hostname {self.name} && exec "$@"', "sh", *cmd]

    def set_link(self, up: bool) -> None:
        """Cut the host off the network, or bring it back."""
        assert self.veth is not None, "a host without a namespace has no link"
        done = ip("link", "set", self.veth, "up" if up else "down")
        assert done.returncode == 0, done.stderr


def ip(*args: str) -> subprocess.CompletedProcess[str]:
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
        done = ip(*step)
        if done.returncode != 0:
            _remove_host(host)
            raise PermissionError(f"ip {' '.join(step)}: {done.stderr.strip()}")
    return host


def _remove_host(host: Host) -> None:
    if host.namespace:
        ip("netns", "del", host.namespace)
    if host.veth:
        ip("link", "del", host.veth)  # normally gone with the namespace


@contextmanager
def two_hosts(tag: str) -> Iterator[list[Host]]:
    """Hosts A and B (namespaces when permitted, else processes on loopback); ``tag`` keeps the
    names of concurrent test modules apart."""
    tag = f"{tag}{os.getpid() % 10000}"
    subnet = 64 + (os.getpid() + sum(map(ord, tag))) % 64  # 100.64.0.0/10: shared address space
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
    try:
        yield made
    finally:
        for host in made:
            _remove_host(host)


@dataclass
class SharedRedis:
    port: int
    process: subprocess.Popen[bytes]

    def url(self, address: str = "127.0.0.1") -> str:
        return f"redis://:{PASSWORD}@{address}:{self.port}/0"


@contextmanager
def shared_redis(hosts: list[Host], data: Path) -> Iterator[SharedRedis]:
    """Redis on this machine, listening on loopback and on each host's link, with a password."""
    port = free_port()
    binds = sorted({"127.0.0.1", *(h.redis_address for h in hosts)})
    config = f"port {port}\nbind {' '.join(binds)}\nrequirepass {PASSWORD}\nappendonly yes\ndir {data}\nsave \"\"\n"
    process = subprocess.Popen(["redis-server", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert process.stdin is not None
    process.stdin.write(config.encode())
    process.stdin.close()
    server = SharedRedis(port, process)
    try:
        wait_until(lambda: pings(server.url()), 10, "redis-server did not start")
        yield server
    finally:
        stop_process(process)


def pings(url: str) -> bool:
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


def start_remote_worker(host: Host, server: SharedRedis, model: Path, logdir: Path,
                        **settings: object) -> RemoteWorker:
    """A worker process on ``host`` (not waited for: see ``remote_workers``)."""
    name = f"cpu@{host.name}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update({"PYTHONPATH": str(ROOT), "FARM_REDIS_URL": server.url(host.redis_address), "FARM_MODEL": str(model),
                "FARM_WORKER_NAME": name, "FARM_HEARTBEAT_SECONDS": "0.5", "FARM_COUNT_EXECUTIONS": "1",
                "FARM_MAX_BATCH_SIZE": "4", "FARM_MAX_INFLIGHT": "8", "FARM_MAX_WAIT_MS": "5"})
    env.update({f"FARM_{k.upper()}": str(v) for k, v in settings.items()})
    logdir.mkdir(parents=True, exist_ok=True)
    log_path = logdir / f"{logdir.name}-{host.name}-{int(time.time())}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(host.wrap([sys.executable, "-m", "worker.main", "--device", "cpu"]), env=env,
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return RemoteWorker(name, host, process, log_path)


@contextmanager
def remote_workers(hosts: list[Host], server: SharedRedis, model: Path, logdir: Path,
                   **settings: object) -> Iterator[list[RemoteWorker]]:
    """One worker per host, returned once each has sent its first heartbeat; stopped after."""
    from protocol.names import heartbeat_key

    started = [start_remote_worker(h, server, model, logdir, **settings) for h in hosts]
    local = redis.Redis.from_url(server.url())
    try:
        for w in started:
            wait_until(lambda w=w: w.process.poll() is not None or local.exists(heartbeat_key(w.name)), 120,
                       f"worker on {w.host.name} not ready")
            assert w.process.poll() is None, w.log_path.read_text()[-3000:]
        yield started
    finally:
        for w in started:
            stop_process(w.process)
