"""``farm up``: one command runs the whole farm on this machine.

It builds the demo model if needed, starts Redis if ``FARM_REDIS_URL`` is not reachable and
points here, then the workers (one per GPU, or one on the CPU), Flower and the Gradio UI. It
prints each URL, waits until every worker's heartbeat says its model is loaded, streams the
children's logs with a ``[name]`` prefix, restarts a worker or Redis that dies (with backoff) and, on
Ctrl-C or SIGTERM, stops everything it started: UI, Flower, workers, then Redis.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from ops.flower import check_auth, is_loopback
from ops.supervise import ChildSpec, Output, Supervisor
from protocol.errors import SettingsError
from protocol.heartbeat import WorkerHeartbeat, read_heartbeats
from protocol.names import heartbeat_key
from ops.model_cache import is_current, served_adapters
from protocol.ownership import Sweeper
from protocol.settings import FarmSettings, check_model_name, default_model_path, project_root, redact_url
from worker.devices import WorkerPlan, count_gpus, plan_workers, worker_launches

DEFAULT_METRICS_PORT = 9400
"""First worker's Prometheus port when ``FARM_METRICS_PORT`` is unset (the next worker gets +1)."""
MODEL_SIZES = ("demo", "tiny")


@dataclass(frozen=True)
class UpOptions:
    gpus: str
    model_size: str
    host: str
    ui: bool
    ui_port: int
    flower_port: int
    metrics_port: int
    data_dir: Path
    ready_timeout: float
    loglevel: str
    models: tuple[tuple[str, str], ...] = ()
    """``--model NAME=PATH`` pairs: one worker group per model (none: ``FARM_MODEL`` or the embedded one)."""


class FarmUpError(Exception):
    """A reason ``farm up`` cannot start, said in one line."""


def _parser(settings: FarmSettings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="farm up", description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="all", help="all (one worker per GPU, CPU if none), none (CPU), or 0,1")
    p.add_argument("--model-size", choices=MODEL_SIZES, default="demo",
                   help="embedded model to build and serve when FARM_MODEL is unset (default demo)")
    p.add_argument("--host", default=settings.ui_host,
                   help="interface Flower and the UI bind (default FARM_UI_HOST, 127.0.0.1)")
    p.add_argument("--no-ui", action="store_true", help="do not start the Gradio UI")
    p.add_argument("--ui-port", type=int, default=settings.ui_port, help="UI port (FARM_UI_PORT)")
    p.add_argument("--flower-port", type=int, default=settings.flower_port, help="Flower port (FARM_FLOWER_PORT)")
    p.add_argument("--metrics-port", type=int, default=settings.metrics_port or DEFAULT_METRICS_PORT,
                   help="first worker's Prometheus port, +1 per worker; 0 disables (FARM_METRICS_PORT)")
    p.add_argument("--data-dir", type=Path, default=project_root() / ".farm",
                   help="where a Redis started here keeps its data (DATA_DIR/redis)")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the workers' models")
    p.add_argument("--loglevel", default="info")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="serve the model at PATH (or hub id) as NAME, one worker group per model on the "
                   "devices of --gpus (repeatable); the first is the default unless FARM_DEFAULT_MODEL says")
    return p


def parse_options(argv: list[str] | None, settings: FarmSettings) -> UpOptions:
    a = _parser(settings).parse_args(argv)
    return UpOptions(a.gpus, a.model_size, a.host, not a.no_ui, a.ui_port, a.flower_port, a.metrics_port,
                     a.data_dir, a.ready_timeout, a.loglevel, parse_models(a.model))


def parse_models(values: list[str]) -> tuple[tuple[str, str], ...]:
    """``--model NAME=PATH`` values as pairs; a bad or repeated name is refused in one line."""
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, path = (part.strip() for part in value.partition("="))
        if not sep or not name or not path:
            raise FarmUpError(f"--model {value!r}: give NAME=PATH (a local directory or a hub id)")
        try:
            check_model_name(name, "--model NAME")
        except SettingsError as error:
            raise FarmUpError(str(error)) from None
        if name in pairs:
            raise FarmUpError(f"--model {name} is given twice")
        pairs[name] = path
    return tuple(pairs.items())


# ------------------------------------------------------------------ planning (pure)


def plan_gpus(gpus: str, gpu_count: int, host: str | None = None) -> list[WorkerPlan]:
    """``all`` -> one worker per GPU (CPU if none); ``none`` -> CPU; ``0,1`` -> those GPUs."""
    if gpus == "all":
        return plan_workers("auto", gpu_count, host)
    if gpus == "none":
        return plan_workers("cpu", 0, host)
    indices = [part.strip() for part in gpus.split(",") if part.strip()]
    if not indices or not all(i.isdigit() for i in indices):
        raise FarmUpError(f"--gpus must be all, none or a list like 0,1; got {gpus!r}")
    try:
        return [plan_workers(f"cuda:{i}", gpu_count, host)[0] for i in dict.fromkeys(indices)]
    except ValueError as error:
        raise FarmUpError(f"--gpus {gpus}: {error}") from None


def worker_specs(plans: list[WorkerPlan], env: dict[str, str], metrics_port: int,
                 loglevel: str) -> list[ChildSpec]:
    """One pinned worker process per plan, each with its own name and metrics port, restarted when it dies."""
    return [ChildSpec(launch.name, launch.cmd, launch.env, restart=True, stop_timeout=30)
            for launch in worker_launches(plans, env, metrics_port, loglevel)]


def model_worker_specs(models: tuple[tuple[str, str], ...], plans: list[WorkerPlan], env: dict[str, str],
                       metrics_port: int, loglevel: str) -> list[ChildSpec]:
    """One worker group per model (``--model NAME=PATH``) on the planned devices, its workers named
    ``NAME-cpu@host``, ``NAME-gpu0@host``; metrics ports follow on from group to group."""
    specs: list[ChildSpec] = []
    base = {k: v for k, v in env.items() if k not in ("FARM_WORKER_NAME", "FARM_ADAPTER", "FARM_ADAPTERS")}
    for index, (name, path) in enumerate(models):
        named = [replace(plan, name=f"{name}-{plan.name}") for plan in plans]
        port = metrics_port + index * len(plans) if metrics_port else 0
        specs += worker_specs(named, {**base, **model_env(name, path)}, port, loglevel)
    return specs


def model_env(name: str, path: str) -> dict[str, str]:
    """The settings of one model's workers. Adapters belong to a base model, so the global
    ``FARM_ADAPTER(S)`` are not passed on; a model built by ``farm make-model`` brings its own two."""
    env = {"FARM_MODEL": path, "FARM_MODEL_NAME": name}
    built = Path(path).expanduser()
    if (built / "adapter").is_dir() and (built / "adapter2").is_dir():
        env.update(FARM_ADAPTER=str(built / "adapter"), FARM_ADAPTERS=f"second={built / 'adapter2'}")
    return env


def flower_spec(env: dict[str, str], host: str, port: int) -> ChildSpec:
    return ChildSpec("flower", [sys.executable, "-m", "ops.flower", "--address", host, "--port", str(port)], env)


def ui_spec(env: dict[str, str], host: str, port: int) -> ChildSpec | None:
    """The Gradio UI, if this checkout has one (``ui/app.py``)."""
    if importlib.util.find_spec("ui.app") is None:
        return None
    return ChildSpec("ui", [sys.executable, "-m", "ui.app"], {**env, "FARM_UI_HOST": host, "FARM_UI_PORT": str(port)})


def api_spec(env: dict[str, str], host: str, settings: FarmSettings) -> ChildSpec | None:
    """``farm api`` beside the UI; not beyond loopback without keys (it would refuse to start)."""
    if not (settings.api_keys or settings.api_keys_file) and not is_loopback(host):
        return None
    return ChildSpec("api", [sys.executable, "-m", "api.main"], {**env, "FARM_API_HOST": host})


def redis_spec(url: str, data_dir: Path) -> ChildSpec:
    """A redis-server for ``url``: append-only, data in ``data_dir``, config (and password) on stdin."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    binds = ["127.0.0.1"] if is_loopback(host) else sorted({"127.0.0.1", socket.gethostbyname(host)})
    if binds != ["127.0.0.1"] and not parts.password:
        raise FarmUpError(f"Redis at {redact_url(url)} would be reachable from the network without a password: "
                          "put one in FARM_REDIS_URL (redis://:PASSWORD@host:port/0)")
    config = [f"port {parts.port or 6379}", f"bind {' '.join(binds)}", f"dir {data_dir}", "appendonly yes",
              "daemonize no", 'logfile ""']
    if parts.password:
        config.append(f"requirepass {parts.password}")
    return ChildSpec("redis", ["redis-server", "-"], {**os.environ}, stdin="\n".join(config).encode() + b"\n",
                     stop_timeout=30, restart=True)  # from its append-only file: queues and results kept


def is_this_machine(host: str) -> bool:
    """Loopback, this host's name, or one of its addresses."""
    if is_loopback(host) or host in ("", "0.0.0.0", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        address = ipaddress.ip_address(socket.gethostbyname(host))
        return address.is_loopback or str(address) in _local_addresses()
    except (OSError, ValueError):
        return False


def _local_addresses() -> set[str]:
    try:
        return set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        return set()


def urls(opts: UpOptions, settings: FarmSettings, workers: list[ChildSpec], ui: bool,
         api: bool = False) -> list[tuple[str, str]]:
    """What to print at start, passwords redacted."""
    login = f" (login {settings.flower_auth.split(':', 1)[0]}:***)" if settings.flower_auth else ""
    shown = [("Redis", redact_url(settings.redis_url)), ("Flower", f"http://{opts.host}:{opts.flower_port}{login}")]
    if ui:
        shown.append(("UI", f"http://{opts.host}:{opts.ui_port}"))
    if api:
        shown.append(("API", f"http://{opts.host}:{settings.api_port}/v1 (OpenAI-compatible)"))
    for spec in workers:
        port = spec.env["FARM_METRICS_PORT"]
        if port != "0":
            shown.append(("metrics", f"http://{settings.metrics_host}:{port}/metrics ({spec.name})"))
    return shown


# ------------------------------------------------------------------ running


class Farm:
    """The running farm: a supervisor, the stop flag and the steps of ``farm up``."""

    def __init__(self, opts: UpOptions, settings: FarmSettings, output: Output) -> None:
        self.opts, self.settings, self.output = opts, settings, output
        self.supervisor = Supervisor(output)
        self.stopping = threading.Event()
        self.env = dict(os.environ)
        self.plans: list[WorkerPlan] = []
        self.workers: list[ChildSpec] = []
        self.api: ChildSpec | None = None

    def say(self, text: str) -> None:
        self.output.say(text)

    def prepare_model(self) -> None:
        """``FARM_MODEL`` as given, or the embedded model, built on first use (with progress);
        with ``--model``, the models given (each must exist if it is a path)."""
        if self.opts.models:
            self._check_model_paths()
            return
        given = os.environ.get("FARM_MODEL")
        if given:
            if given.startswith((".", "/", "~")) and not Path(given).expanduser().exists():
                raise FarmUpError(f"FARM_MODEL={given} does not exist; unset it to serve the embedded demo model")
            return
        size = self.opts.model_size
        path = default_model_path() if size == "demo" else str(project_root() / ".farm" / "models" / size)
        built = is_current(path, size)
        self.say(f"model: embedded {size} model at {path}" if built else
                 f"model: building the embedded {size} model into {path} (first use"
                 f"{'; converting it and training its two adapters takes a few minutes' if size == 'demo' else ''})")
        self._run_to_end(ChildSpec("model", [sys.executable, "-m", "ops.make_model", path, "--size", size],
                                   self.env))
        self.env["FARM_MODEL"] = path
        if not (self.settings.adapter or self.settings.adapters):
            self.env.update(served_adapters(path))

    def _check_model_paths(self) -> None:
        for name, path in self.opts.models:
            if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
                raise FarmUpError(f"--model {name}={path} does not exist; build a model there with "
                                  f"`./farm make-model {path} --size tiny` or give a hub id")
        names = [name for name, _ in self.opts.models]
        default = self.settings.default_model or names[0]
        if default not in names:
            raise FarmUpError(f"FARM_DEFAULT_MODEL={default} is none of the models given ({', '.join(names)})")
        self.env["FARM_DEFAULT_MODEL"] = default  # every child: clients and workers agree on it
        self.say(f"models: {', '.join(f'{n}={p}' for n, p in self.opts.models)} (default {default})")

    def _run_to_end(self, spec: ChildSpec) -> None:
        child = self.supervisor.start(spec)
        while child.exited() is None:
            if self.stopping.wait(0.2):
                return
        self.supervisor.children.remove(child)
        if child.exited() != 0:
            raise FarmUpError(f"{spec.name} failed with exit code {child.exited()}; see the [{spec.name}] lines above")

    def ensure_redis(self) -> None:
        url = self.settings.redis_url
        if _redis_answers(url):
            self.say(f"Redis at {redact_url(url)} is up; using it")
            return
        host = urlsplit(url).hostname or "127.0.0.1"
        if not is_this_machine(host):
            raise FarmUpError(f"Redis at {redact_url(url)} is unreachable and is not on this machine; "
                              "start it there or point FARM_REDIS_URL at a running Redis")
        data = (self.opts.data_dir / "redis").resolve()
        data.mkdir(parents=True, exist_ok=True)
        child = self.supervisor.start(redis_spec(url, data))
        deadline = time.monotonic() + 20
        while not _redis_answers(url):
            if child.exited() is not None or time.monotonic() > deadline:
                raise FarmUpError(f"redis-server did not start on {redact_url(url)}; see the [redis] lines above")
            time.sleep(0.1)
        self.say(f"Redis started with its data in {data}")

    def preflight(self) -> None:
        """Everything that can be refused before a minute is spent building a model."""
        check_auth(self.opts.host, self.settings.flower_auth)
        self.plans = plan_gpus(self.opts.gpus, count_gpus() if self.opts.gpus != "none" else 0)
        self.workers = self._worker_specs()
        ports = [("Flower", self.opts.host, self.opts.flower_port, "--flower-port")]
        if self.opts.ui:
            ports.append(("UI", self.opts.host, self.opts.ui_port, "--ui-port"))
        ports += [(f"metrics of {s.name}", self.settings.metrics_host, int(s.env["FARM_METRICS_PORT"]),
                   "--metrics-port") for s in self.workers if s.env["FARM_METRICS_PORT"] != "0"]
        check_ports_free(ports)

    def start_services(self) -> bool:
        """Workers, Flower and (if present and wanted) the UI; returns whether the UI started."""
        self.env["FARM_REDIS_URL"] = self.settings.redis_url
        self.workers = self._worker_specs()
        for spec in self.workers:
            self.supervisor.start(spec)
        self.supervisor.start(flower_spec(self.env, self.opts.host, self.opts.flower_port))
        ui = ui_spec(self.env, self.opts.host, self.opts.ui_port) if self.opts.ui else None
        if ui is not None:
            self.supervisor.start(ui)
        elif self.opts.ui:
            self.say("no UI in this checkout (ui/app.py); running without it")
        self.api = api_spec(self.env, self.opts.host, self.settings)
        if self.api is not None:
            self.supervisor.start(self.api)
        else:
            self.say(f"API not started: {self.opts.host} is beyond loopback and FARM_API_KEYS is unset")
        return ui is not None

    def _worker_specs(self) -> list[ChildSpec]:
        if self.opts.models:
            return model_worker_specs(self.opts.models, self.plans, self.env, self.opts.metrics_port,
                                      self.opts.loglevel)
        return worker_specs(self.plans, self.env, self.opts.metrics_port, self.opts.loglevel)

    def wait_ready(self) -> bool:
        """Until every worker's heartbeat says its model is loaded (or a stop is asked)."""
        client = redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=2)
        deadline = time.monotonic() + self.opts.ready_timeout
        while not self.stopping.wait(0.25):
            self.supervisor.poll()
            records = self._ready_records(client)
            if records is not None:
                models = sorted({f"{r.model_name} ({r.model_path})" for r in records})
                self.say(f"ready: {len(records)} worker(s) serving {', '.join(models)}; Ctrl-C stops the farm")
                return True
            if time.monotonic() > deadline:
                self.say(f"workers not ready after {self.opts.ready_timeout:.0f}s; still waiting")
                deadline = float("inf")
        return False

    def _ready_records(self, client: redis.Redis) -> list[WorkerHeartbeat] | None:
        """Heartbeats of all our workers once each says ready, else None. The pid must be our
        child's: a record left by an earlier run under the same name does not count."""
        records = []
        for child in self.supervisor.children:
            if child.name in {spec.name for spec in self.workers}:
                record = _heartbeat(client, child.name)
                if record is None or not record.ready or record.pid != child.pid:
                    return None
                records.append(record)
        return records

    def supervise(self) -> None:
        sweeper = Sweeper(redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=1, socket_timeout=2),
                          self.settings.heartbeat_seconds)  # dead workers' messages back in seconds
        while not self.stopping.wait(0.5):
            self.supervisor.poll()
            sweeper.poll()

    def stop(self) -> None:
        self.say("stopping the farm (UI, Flower, workers, then Redis)")
        self.supervisor.stop([["model"], ["ui"], ["flower"], [spec.name for spec in self.workers], ["redis"]])
        self.say("stopped")


def check_ports_free(ports: list[tuple[str, str, int, str]]) -> None:
    """Refuse at once, naming the option, if a port a child would listen on is taken."""
    for label, host, port, option in ports:
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError as error:
                raise FarmUpError(f"{label} cannot listen on {host}:{port} ({error.strerror}); "
                                  f"choose another port with {option}") from None


def _redis_answers(url: str) -> bool:
    """True if Redis answers; a wrong password is an error, not a reason to start another one."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping())
    except (redis.AuthenticationError, redis.ResponseError) as error:  # before ConnectionError: a subclass
        raise FarmUpError(f"Redis at {redact_url(url)} refused us: {error}") from None
    except (redis.ConnectionError, redis.TimeoutError):
        return False


def _heartbeat(client: redis.Redis, name: str) -> WorkerHeartbeat | None:
    try:
        beats = read_heartbeats([client.get(heartbeat_key(name))])
    except redis.RedisError:  # Redis restarting: ask again at the next poll
        return None
    return beats[0] if beats else None


def run(opts: UpOptions, settings: FarmSettings, output: Output) -> int:
    farm = Farm(opts, settings, output)

    def on_signal(signum: int, _: Any) -> None:
        if not farm.stopping.is_set():
            farm.say(f"{signal.Signals(signum).name} received")
        farm.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        farm.preflight()
        farm.prepare_model()
        if farm.stopping.is_set():
            return 0
        farm.ensure_redis()
        with_ui = farm.start_services()
        for label, url in urls(opts, settings, farm.workers, with_ui, api=farm.api is not None):
            farm.say(f"{label:<8} {url}")
        if farm.wait_ready():
            farm.supervise()
        return 0
    finally:
        farm.stop()


def main(argv: list[str] | None = None) -> int:
    output = Output()
    try:
        settings = FarmSettings.from_env()
        opts = parse_options(argv, settings)
        return run(opts, settings, output)
    except (FarmUpError, SettingsError) as error:
        output.say(f"error: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
