"""``farm worker``: one Celery worker process per device, model loaded before it takes work."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from protocol.celery_app import make_celery
from protocol.heartbeat import WorkerHeartbeat
from protocol.names import model_queues
from protocol.ownership import Liveness
from protocol.ownership import transport_options as owner_options
from protocol.schema import GenerationRequest, Limits
from protocol.redis_conn import connect
from protocol.settings import FarmSettings
from worker.transport import install as install_safe_transport
from worker.heap import retain_freed_memory
from worker.devices import WorkerPlan, apply_thread_policy, count_gpus, on_own_thread, plan_workers, worker_launches
from worker.metrics import MeteredSink, WorkerMetrics, connect_task_signals

log = logging.getLogger("batchfarm.worker")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    apply_thread_policy()  # before anything imports torch (its OpenMP runtime reads it at load)
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = FarmSettings.from_env()
    plans = plan_workers(args.device, count_gpus() if args.device != "cpu" else 0)
    if len(plans) == 1 and (args.device == "cpu" or args.in_process):
        return run_worker(settings, plans[0], args.loglevel)
    return _supervise(plans, args, settings)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farm worker", description=__doc__)
    parser.add_argument("--device", default="auto", help="cpu, cuda:N or auto (one process per GPU)")
    parser.add_argument("--loglevel", default="info")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    return parser


def _supervise(plans: list[WorkerPlan], args: argparse.Namespace, settings: FarmSettings) -> int:
    """Start one pinned child per device and wait for them."""
    launches = worker_launches(plans, dict(os.environ), settings.metrics_port, args.loglevel)
    children = [subprocess.Popen(launch.cmd, env=launch.env) for launch in launches]
    signal.signal(signal.SIGTERM, lambda *_: [c.terminate() for c in children])
    try:
        return max(c.wait() for c in children)
    except KeyboardInterrupt:
        for c in children:
            c.terminate()
        return max(c.wait() for c in children)


def run_worker(settings: FarmSettings, plan: WorkerPlan, loglevel: str = "info") -> int:
    """Load the model, start the engine, then let Celery take messages."""
    from worker.engine.build import make_engine
    from worker.engine.warmup import warm_up
    from worker.model import load_model, render_prompt
    from worker.quiet import quiet_logs
    from worker.streams import redis_sinks

    quiet_logs()
    if settings.keep_freed_memory:
        retain_freed_memory()  # before the model's first tensors
    name = settings.worker_name or plan.name
    started = time.monotonic()
    loaded = on_own_thread(lambda: load_model(settings, plan.device))  # no OpenMP team kept on main
    client = connect(settings.redis_url, settings=settings)
    sinks = redis_sinks(client, settings)
    metrics = WorkerMetrics()

    def render(request: GenerationRequest) -> str:
        return render_prompt(loaded, settings.template, request.prompt, request.messages)

    from worker.adapters import AdapterRegistry, register_adapter_control
    from worker.heartbeat import Heartbeat, worker_identity
    from worker.tasks import register_generate

    engine = make_engine(settings, loaded, sinks.with_output(MeteredSink(sinks.output, metrics)), name, render,
                         plan.device)
    engine.start()
    if settings.warmup:  # on the model thread: its heap arena keeps the memory (worker/heap.py)
        engine.call(lambda: warm_up(engine.core.runner, settings)).result()
    install_safe_transport()  # a malformed message must not stop the worker
    model = settings.served_model_name()
    queues = model_queues(model, plain=settings.takes_unnamed())  # its model's; the plain ones if default
    app = make_celery(settings, queues=queues)
    liveness = Liveness(client, name, settings.heartbeat_seconds).start()  # owns what this process pops
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, **owner_options(liveness)}
    identity = worker_identity(settings, plan, loaded, name, time.monotonic() - started, queues)
    adapters = AdapterRegistry(engine, loaded)  # adapters load at run time (control command)
    register_adapter_control(adapters)
    register_generate(app, engine, lambda: _limits(settings, model, adapters.names()),
                      sinks.counter.note_redelivery, model)
    _start_metrics(metrics, engine, settings, identity)
    heartbeat = Heartbeat(client, engine, identity, settings.heartbeat_seconds, adapters.names, metrics.summary,
                          known_for=settings.result_expires)
    _connect_lifecycle(heartbeat, engine)
    log.info("model %s loaded in %.1fs; worker %s taking work from %s (queues %s)", model, identity.load_seconds,
             name, settings.redacted_redis_url(), ",".join(queues))
    app.worker_main(_celery_argv(settings, name, loglevel, queues))
    return 0


def _limits(settings: FarmSettings, model: str, adapters: list[str]) -> Limits:
    """This worker's limits: its one model (the model of a request that names none) and adapters."""
    return Limits.from_settings(settings, adapters, {model: tuple(adapters)}, model)


def _start_metrics(metrics: WorkerMetrics, engine: Any, settings: FarmSettings, identity: WorkerHeartbeat) -> None:
    """Prometheus endpoint of this process (its port is in the heartbeat so others find it)."""
    metrics.describe(identity.to_dict())
    metrics.watch_engine(engine)
    connect_task_signals(metrics)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.metrics_host)


def _connect_lifecycle(heartbeat: Any, engine: Any) -> None:
    # Ready only once Celery consumes: the model is loaded before worker_main is called.
    @worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        heartbeat.start()
        log.info("worker ready")

    @worker_shutdown.connect(weak=False)
    def _shutdown(**_: Any) -> None:
        heartbeat.stop()
        engine.stop()


def _celery_argv(settings: FarmSettings, name: str, loglevel: str, queues: tuple[str, ...]) -> list[str]:
    # threads pool: one process per device, the model loaded once, no fork after torch work.
    # Queues in priority order (queue_order_strategy): the model's interactive ones first.
    return ["worker", "--pool=threads", f"--concurrency={settings.max_inflight}", "-Q", ",".join(queues),
            "-n", name, f"--loglevel={loglevel}", "-E", "--without-gossip"]


if __name__ == "__main__":
    sys.exit(main())
