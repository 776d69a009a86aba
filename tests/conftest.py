"""Fixtures: a real redis-server on a free port, the tiny model, and real worker processes.

Everything started here is stopped here, by PID. Nothing depends on a Redis already running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from bench.procs import free_port
from bench.procs import stop as stop_process
from protocol.heartbeat import WorkerHeartbeat
from protocol.names import heartbeat_key

pytest_plugins = ["tests.reliability_report"]

ROOT = Path(__file__).resolve().parent.parent
MODEL_CACHE = ROOT / ".farm" / "test-models"
OUTPUT = ROOT / "test-output"
DATABASES = 64  # redis-server --databases: one per named test database (RedisServer.db)


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    password: str = ""
    dbs: dict[str, int] = field(default_factory=dict)

    def db(self, name: str | int = 0) -> int:
        """The database number of a test's own name: one database per name, never shared by two modules.

        Database 0 is the shared worker's; every other user names its database, so that a module's
        leftovers (a worker's heartbeat that outlives its fixture for a TTL) never leak into another's.
        """
        if isinstance(name, int):
            if name != 0:
                raise ValueError(f"name the database (redis_server.url('my-module')), not {name}: numbers collide")
            return 0
        if name not in self.dbs:
            if len(self.dbs) + 1 >= DATABASES:
                raise RuntimeError(f"more than {DATABASES - 1} named test databases: raise DATABASES")
            self.dbs[name] = len(self.dbs) + 1
        return self.dbs[name]

    def url(self, db: str | int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{self.db(db)}"

    def client(self, db: str | int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db))

    def stop(self) -> None:
        stop_process(self.process)


def start_redis(workdir: Path, port: int | None = None, password: str = "",
                appendonly: bool = False) -> RedisServer:
    """A private redis-server on loopback (append-only persistence when asked)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run the tests with ./farm test, which installs it")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir),
           "--appendonly", "yes" if appendonly else "no", "--databases", str(DATABASES),
           "--logfile", str(workdir / "redis.log")]
    if password:
        cmd += ["--requirepass", password]
    server = RedisServer(port, subprocess.Popen(cmd), workdir, password)
    wait_until(lambda: _pings(server), 10, "redis-server did not start")
    return server


def _pings(server: RedisServer) -> bool:
    try:
        return bool(server.client().ping())
    except redis.RedisError:
        return False


def wait_until(predicate: object, timeout: float, message: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"{message} (after {timeout}s)")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny test model, built once and cached under .farm/ (deterministic, seconds); the CPU
    decode-attention kernel is built here too, once, rather than by the first workers at once."""
    from ops.make_model import ensure_model
    from worker import decode_attention

    decode_attention.load()
    return ensure_model(MODEL_CACHE / "tiny", "tiny")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo model (SmolLM2-135M-Instruct converted from its GGUF, with two distilled LoRA
    adapters), built once and cached under .farm/ (minutes the first time: the adapters train)."""
    from ops.make_model import ensure_model

    return ensure_model(MODEL_CACHE / "demo", "demo")


@dataclass
class WorkerProcess:
    name: str
    redis_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)

    def heartbeat(self) -> WorkerHeartbeat | None:
        raw = redis.Redis.from_url(self.redis_url).get(heartbeat_key(self.name))
        return WorkerHeartbeat.parse(raw) if raw else None


def start_worker(redis_url: str, model: Path, logdir: Path, name: str = "cpu@test",
                 **settings: object) -> WorkerProcess:
    """A real ``farm worker --device cpu`` process; returns once its heartbeat says ready."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FARM_REDIS_URL": redis_url, "FARM_MODEL": str(model),
           "FARM_WORKER_NAME": name, "FARM_HEARTBEAT_SECONDS": "0.5"}
    env.update({f"FARM_{k.upper()}": str(v) for k, v in settings.items()})
    logdir.mkdir(parents=True, exist_ok=True)
    log_path = logdir / f"worker-{name.replace('@', '-')}-{int(time.time() * 1000)}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "worker.main", "--device", "cpu"],
                                   env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    worker = WorkerProcess(name, redis_url, process, log_path, env)
    try:
        wait_until(lambda: process.poll() is not None or worker.heartbeat() is not None, 120,
                   "worker did not become ready")
    except AssertionError:
        worker.stop()
        raise
    if process.poll() is not None:
        raise AssertionError(f"worker exited with {process.returncode}:\n{worker.log()[-3000:]}")
    return worker


@pytest.fixture(scope="session")
def farm_worker(redis_server: RedisServer, tiny_model: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """The shared worker: tiny fp32 model with two LoRA adapters, executions counted, faults
    injectable by prompt markers."""
    worker = start_worker(
        redis_server.url(0), tiny_model, tmp_path_factory.mktemp("worker"),
        adapter=tiny_model / "adapter", adapters=f"second={tiny_model / 'adapter2'}",
        count_executions=1, inject_faults=1, max_batch_size=16, max_wait_ms=20)
    yield worker
    worker.stop()


@pytest.fixture()
def client(farm_worker: WorkerProcess):  # type: ignore[no-untyped-def]
    from producer import FarmClient

    return FarmClient(farm_worker.redis_url)
