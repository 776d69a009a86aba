"""The worker heartbeat: what a worker says of itself, beside the request and the result.

A worker writes one json record under ``heartbeat_key(name)`` every ``FARM_HEARTBEAT_SECONDS``
with an expiry of three intervals; ``farm status``, ``farm up``, the UI and ``FarmClient`` read it.
``WorkerHeartbeat.to_json`` is the one place that writes it and ``WorkerHeartbeat.parse`` the one
place that reads it. Workers of different versions share a farm, so parsing tolerates unknown
fields and defaults missing ones; a version adds fields and never changes what one means.

Tokens per second has one definition here (``busy_tokens_per_second``), used by the heartbeat,
the worker's metrics, ``farm status`` and the UI: tokens over the seconds batches ran, never the
idle time between them.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol, Union, get_args, get_origin, get_type_hints

HEARTBEAT_VERSION = 1
"""1: typed record with ``version``, ``state``, ``model_name``, ``model_path`` and ``queues``.
Records without a version (0) came from workers before the schema; they parse the same way."""
STATES = ("loading", "ready")
TOKENS_PER_SECOND_WINDOW = 60.0
"""Seconds of recent batches that tokens per second covers."""
RECENT_BATCHES = 64
"""Batches a record carries for the UI's chart."""


class HeartbeatError(ValueError):
    """A heartbeat record that cannot be read: not json, not an object, or a field of the wrong type."""


class BatchLike(Protocol):
    @property
    def at(self) -> float: ...
    @property
    def tokens(self) -> int: ...
    @property
    def seconds(self) -> float: ...


@dataclass(frozen=True)
class BatchStat:
    """One finished batch (or busy segment of the continuous engine): when it ended, how many
    requests, how many completion tokens and how many seconds it ran."""

    at: float = 0.0
    size: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def busy_tokens_per_second(batches: Iterable[BatchLike], now: float,
                           window: float = TOKENS_PER_SECOND_WINDOW) -> float:
    """Completion tokens per second of busy time over the batches that ended in the last
    ``window`` seconds (0 when idle that long). Each batch's ``seconds`` must be the time it ran."""
    recent = [b for b in batches if b.at >= now - window]
    seconds = sum(b.seconds for b in recent)
    return sum(b.tokens for b in recent) / seconds if seconds > 0 else 0.0


def public_model_name(model: str, local: bool | None = None) -> str:
    """The name clients see: a hub id as it is, a local directory by its name. ``local`` unknown
    (a reader far from the worker's disk): a path is what starts with ``/``, ``.`` or ``~``."""
    is_local = model.startswith(("/", ".", "~")) if local is None else local
    return (Path(model).name or model) if is_local else model


@dataclass(frozen=True)
class WorkerHeartbeat:
    """One worker's record: identity and model, then load, then recent latencies."""

    version: int = HEARTBEAT_VERSION
    name: str = ""
    host: str = ""
    pid: int = 0
    device: str = ""
    cuda_visible_devices: str = ""
    model_name: str = ""
    """Public name (``/v1/models``, routing): ``FarmSettings.served_model_name()`` of the worker
    (``FARM_MODEL_NAME``, else the last part of ``FARM_MODEL``); derived by ``public_model_name``
    for records from before version 1."""
    model_path: str = ""
    """What ``FARM_MODEL`` named: a hub id or a path on the worker's host."""
    quant: str = "none"
    packed_layers: int = 0
    adapters: tuple[str, ...] = ()
    strategy: str = ""
    max_batch_size: int = 0
    queues: tuple[str, ...] = ()
    """Celery queues the worker consumes."""
    metrics_port: int | None = None
    state: str = "loading"
    load_seconds: float = 0.0
    started_at: float = 0.0
    updated_at: float = 0.0
    batches: int = 0
    requests: int = 0
    failed: int = 0
    tokens: int = 0
    oom_splits: int = 0
    running: int = 0
    waiting: int = 0
    in_flight: int = 0
    mean_batch_size: float = 0.0
    tokens_per_second: float = 0.0
    """Over busy time of the last ``TOKENS_PER_SECOND_WINDOW`` seconds (``busy_tokens_per_second``)."""
    recent_batches: tuple[BatchStat, ...] = ()
    queue_wait_seconds: float | None = None
    first_token_seconds: float | None = None
    decode_seconds_per_token: float | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def seconds_since_beat(self, now: float) -> float:
        return max(0.0, now - self.updated_at)

    def to_dict(self) -> dict[str, Any]:
        """The json form; ``ready`` and ``model`` are kept for readers older than version 1."""
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {**data, "ready": self.ready, "model": self.model_path}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def parse(cls, raw: str | bytes) -> WorkerHeartbeat:
        """The record in ``raw`` (json); ``HeartbeatError`` says what is wrong with a bad one."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise HeartbeatError(f"heartbeat is not json: {error}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> WorkerHeartbeat:
        if not isinstance(data, dict):
            raise HeartbeatError(f"heartbeat must be a json object, got {type(data).__name__}")
        data = _upgrade(data)
        known = {f.name: _CONVERTERS[f.name](f.name, data[f.name]) for f in fields(cls) if f.name in data}
        return replace(cls(version=0), **known)


def read_heartbeats(values: Iterable[str | bytes | None]) -> list[WorkerHeartbeat]:
    """The records among ``values`` (Redis replies; ``None`` for an expired key). A record that
    does not parse is left out: it names no worker that could be shown or sent work."""
    beats = []
    for raw in values:
        try:
            if raw:
                beats.append(WorkerHeartbeat.parse(raw))
        except HeartbeatError:
            continue
    return beats


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """Fields of version 1 derived from a version 0 record's (``model``, ``ready``)."""
    data = dict(data)
    if "model_path" not in data and "model" in data:
        data["model_path"] = data["model"]
    if "model_name" not in data and isinstance(data.get("model_path"), str):
        data["model_name"] = public_model_name(data["model_path"])
    if "state" not in data and "ready" in data:
        data["state"] = "ready" if data["ready"] is True else "loading"
    return data


Converter = Callable[[str, Any], Any]


def _scalar(kind: type) -> Converter:
    def convert(name: str, value: Any) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise HeartbeatError(f"heartbeat field {name} must be {kind.__name__}, got {value!r}")
        return value
    return convert


def _optional(inner: Converter) -> Converter:
    return lambda name, value: None if value is None else inner(name, value)


def _items(inner: Converter) -> Converter:
    def convert(name: str, value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise HeartbeatError(f"heartbeat field {name} must be a list, got {value!r}")
        return tuple(inner(name, item) for item in value)
    return convert


def _batch(name: str, value: Any) -> BatchStat:
    if not isinstance(value, dict):
        raise HeartbeatError(f"heartbeat field {name} must hold objects, got {value!r}")
    known = {f.name: _BATCH_CONVERTERS[f.name](f"{name}.{f.name}", value[f.name])
             for f in fields(BatchStat) if f.name in value}
    return BatchStat(**known)


def _converter(hint: Any) -> Converter:
    """How to read a field of type ``hint`` from json."""
    args = get_args(hint)
    if get_origin(hint) in (Union, types.UnionType):
        return _optional(_converter(next(a for a in args if a is not type(None))))
    if get_origin(hint) is tuple:
        return _items(_batch if args[0] is BatchStat else _converter(args[0]))
    return _scalar(hint)


_BATCH_CONVERTERS = {name: _converter(hint) for name, hint in get_type_hints(BatchStat).items()}
_CONVERTERS = {name: _converter(hint) for name, hint in get_type_hints(WorkerHeartbeat).items()}
