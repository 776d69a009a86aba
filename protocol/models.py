"""The farm's models: which are served (by live workers) and which are known, routing by name.

Routing is Celery's own: each model has its queues (``protocol.names.model_queue``) and each
worker consumes its model's; there is no controller. What a client needs to route is read from
Redis: the workers' heartbeats (``model_name``, ``adapters``) and each model's record
(``models_key``), which its workers refresh and which outlives them for ``FARM_RESULT_EXPIRES``
seconds, so that a model whose workers restart is still known (its bulk rows wait in its queue)
while a name never served is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace

from protocol.errors import NoWorkerError
from protocol.heartbeat import WorkerHeartbeat
from protocol.names import INTERACTIVE_QUEUE
from protocol.schema import GenerationRequest, Limits
from protocol.settings import FarmSettings


@dataclass(frozen=True)
class ServedModel:
    """One model of the farm: its public name, its adapters and the live workers serving it."""

    name: str
    adapters: tuple[str, ...] = ()
    workers: tuple[str, ...] = ()
    """Names of the live workers serving it (none: known, but no worker online right now)."""
    queues: tuple[str, ...] = ()
    """The Celery queues its workers consume."""
    last_seen: float = 0.0

    @property
    def live(self) -> bool:
        return bool(self.workers)

    def ids(self) -> list[str]:
        """The ``model`` values a request may give for it: ``demo``, ``demo:pirate`` ... (as vLLM
        lists each LoRA adapter as a model id of its own; ``base`` is the model itself)."""
        return [self.name, *(f"{self.name}:{a}" for a in self.adapters if a != "base")]

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "adapters": list(self.adapters), "workers": list(self.workers),
                "queues": list(self.queues)}

    def record(self) -> str:
        """The json a worker writes in ``models_key()`` (no workers: those are the heartbeats')."""
        return json.dumps({**self.to_dict(), "workers": []})

    @classmethod
    def parse(cls, raw: str | bytes) -> ServedModel | None:
        """A model record, or None if it cannot be read (left out, like a bad heartbeat)."""
        try:
            data = json.loads(raw)
            return cls(str(data["name"]), tuple(map(str, data.get("adapters", ()))), (),
                       tuple(map(str, data.get("queues", ()))), float(data.get("last_seen", 0.0)))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def served_models(beats: Iterable[WorkerHeartbeat]) -> list[ServedModel]:
    """The models of the live workers, by name, each with its workers and their adapters."""
    models: dict[str, ServedModel] = {}
    for beat in sorted(beats, key=lambda b: b.name):
        if not beat.model_name:  # a record without a model name (a worker from before names)
            continue
        seen = models.get(beat.model_name, ServedModel(beat.model_name))
        models[beat.model_name] = replace(
            seen, adapters=tuple(dict.fromkeys((*seen.adapters, *beat.adapters))),
            workers=(*seen.workers, beat.name), queues=tuple(dict.fromkeys((*seen.queues, *beat.queues))),
            last_seen=max(seen.last_seen, beat.updated_at))
    return sorted(models.values(), key=lambda m: m.name)


@dataclass(frozen=True)
class Catalog:
    """What a client routes by: the live workers and the models served now or recently."""

    beats: tuple[WorkerHeartbeat, ...] = ()
    records: tuple[ServedModel, ...] = ()

    def served(self) -> dict[str, ServedModel]:
        return {m.name: m for m in served_models(self.beats)}

    def known(self) -> dict[str, ServedModel]:
        """Served now, or recently (a record its workers left); the live view wins."""
        return {**{m.name: m for m in self.records}, **self.served()}

    def limits(self, settings: FarmSettings) -> Limits:
        """Request limits: adapters of the workers online, the known models with their adapters,
        and the default model (``FARM_DEFAULT_MODEL``); unknown parts are ``None``."""
        adapters = sorted({a for beat in self.beats for a in beat.adapters})
        known: Mapping[str, tuple[str, ...]] = {name: m.adapters for name, m in self.known().items()}
        return Limits.from_settings(settings, adapters or None, known or None, settings.default_model or None)

    def check_served(self, request: GenerationRequest, kind: str) -> None:
        """An interactive request for a model no live worker serves fails now (``NoWorkerError``);
        bulk rows wait in their model's queue for its workers to come back."""
        served = self.served()
        if kind == INTERACTIVE_QUEUE and request.model is not None and request.model not in served:
            raise NoWorkerError.for_model(request.model, sorted(served))
