"""The worker's heartbeat: its ``WorkerHeartbeat`` record in Redis, rewritten every interval."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import redis

from protocol.heartbeat import RECENT_BATCHES, BatchStat, WorkerHeartbeat, busy_tokens_per_second
from protocol.models import ServedModel
from protocol.names import QUEUES, heartbeat_key, models_key
from protocol.settings import FarmSettings
from worker.devices import WorkerPlan

if TYPE_CHECKING:  # the engine imports torch; the record is built from its counters alone
    from worker.engine import Engine

log = logging.getLogger(__name__)


def worker_identity(settings: FarmSettings, plan: WorkerPlan, loaded: Any, name: str,
                    load_seconds: float, queues: tuple[str, ...] = QUEUES) -> WorkerHeartbeat:
    """The parts of the record that stay while the worker runs (adapters excepted)."""
    model = str(loaded.name)
    return WorkerHeartbeat(
        name=name, host=socket.gethostname(), pid=os.getpid(), device=plan.device,
        # the launcher's pin: a pinned child plans itself as cuda:0 and no longer knows its GPU
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", plan.env.get("CUDA_VISIBLE_DEVICES", "")),
        model_name=settings.served_model_name(), model_path=model,
        quant=loaded.quant, packed_layers=loaded.packed_layers, adapters=tuple(settings.adapter_names()),
        strategy=settings.strategy, max_batch_size=settings.max_batch_size, queues=queues,
        metrics_port=settings.metrics_port or None, state="ready", load_seconds=round(load_seconds, 2),
        started_at=time.time())


def heartbeat_record(identity: WorkerHeartbeat, engine: Engine, adapters: list[str],
                     now: float | None = None) -> WorkerHeartbeat:
    """``identity`` with the engine's load and recent batches as of ``now``."""
    now = time.time() if now is None else now
    stats = engine.stats
    recent = list(stats.recent)
    return dataclasses.replace(
        identity, adapters=tuple(adapters), updated_at=now, batches=stats.batches, requests=stats.requests,
        failed=stats.failed, tokens=stats.tokens, oom_splits=stats.oom_splits, running=engine.running,
        waiting=engine.waiting, mean_batch_size=(stats.requests / stats.batches) if stats.batches else 0.0,
        tokens_per_second=busy_tokens_per_second(recent, now),
        recent_batches=tuple(BatchStat(b.at, b.size, b.tokens, b.seconds) for b in recent[-RECENT_BATCHES:]))


class Heartbeat:
    """Writes the record every ``interval`` seconds with an expiry of three intervals."""

    def __init__(self, client: redis.Redis, engine: Engine, identity: WorkerHeartbeat, interval: float,
                 adapters: Callable[[], list[str]],
                 extra: Callable[[], Mapping[str, Any]] | None = None, known_for: int = 86400) -> None:
        self.client, self.engine, self.identity = client, engine, identity
        self.interval, self.adapters, self.extra = interval, adapters, extra
        """``extra``: more live fields of the record by name (the metrics' latency summary)."""
        self.known_for = known_for
        """Seconds the model's record outlives the last beat (``protocol.models``)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.client.delete(heartbeat_key(self.identity.name))
        except redis.RedisError:
            pass

    def beat(self) -> None:
        record = heartbeat_record(self.identity, self.engine, self.adapters())
        if self.extra is not None:
            record = dataclasses.replace(record, **self.extra())
        ttl = max(1, int(self.interval * 3))
        served = ServedModel(record.model_name, record.adapters, (), record.queues, record.updated_at)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(heartbeat_key(self.identity.name), record.to_json(), ex=ttl)
        pipe.hset(models_key(), record.model_name, served.record())
        pipe.expire(models_key(), self.known_for)
        pipe.execute()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except redis.RedisError as error:  # Redis restarting: beat again next time
                log.warning("heartbeat failed: %s", error)
            self._stop.wait(self.interval)
