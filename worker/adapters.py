"""Loading LoRA adapters into running workers: the ``load_adapter`` Celery control command.

``app.control.broadcast("load_adapter", arguments={"name": ..., "path": ...}, reply=True)``
reaches every worker; each loads the adapter on its model thread (between batches or decode
steps, never under a running forward), then offers it to requests and in its heartbeat. Clients
learn the new name from the heartbeat (``FarmClient.limits()``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.worker.control import control_command

from protocol.settings import BASE_ADAPTER

if TYPE_CHECKING:  # clients import this module for broadcast_load_adapter: no torch for them
    from worker.engine import Engine

log = logging.getLogger(__name__)

LOAD_ADAPTER = "load_adapter"
LOAD_TIMEOUT_S = 120.0


class AdapterRegistry:
    """The adapters one worker offers; the generate task and the heartbeat read it."""

    def __init__(self, engine: Engine, loaded: Any) -> None:
        self.engine, self.loaded = engine, loaded

    def names(self) -> list[str]:
        return [BASE_ADAPTER, *self.loaded.adapters]

    def load(self, name: str, path: str) -> dict[str, Any]:
        """Load ``path`` as adapter ``name`` on the model thread; a reply for the control command."""
        if not name or name == BASE_ADAPTER or "=" in name or "," in name:
            return {"ok": False, "error": f"invalid adapter name {name!r}"}
        if name in self.loaded.adapters:
            return {"ok": True, "adapters": self.names(), "note": "already loaded"}
        from worker.model import load_adapter

        try:
            self.engine.call(lambda: load_adapter(self.loaded, name, path)).result(LOAD_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - reported to the caller, the worker keeps serving
            log.warning("loading adapter %s from %s failed: %r", name, path, error)
            return {"ok": False, "error": f"{type(error).__name__}: {error}"}
        log.info("adapter %s loaded from %s", name, path)
        return {"ok": True, "adapters": self.names()}


def register_adapter_control(registry: AdapterRegistry) -> None:
    """Make ``load_adapter`` a control command of this worker process."""

    @control_command(args=[("name", str), ("path", str)], signature="<name> <path>")  # type: ignore[untyped-decorator]
    def load_adapter(state: Any, name: str, path: str, **_: Any) -> dict[str, Any]:
        """Load a LoRA adapter into the running worker."""
        return registry.load(name, path)


def broadcast_load_adapter(app: Celery, name: str, path: str, timeout: float = LOAD_TIMEOUT_S,
                           destination: list[str] | None = None) -> list[dict[str, Any]]:
    """Ask every worker (or ``destination``) to load an adapter; their replies, one per worker.

    Without ``destination`` the number of workers is unknown, so replies are collected for the
    whole ``timeout``."""
    replies = app.control.broadcast(LOAD_ADAPTER, arguments={"name": name, "path": path}, reply=True,
                                    timeout=timeout, destination=destination,
                                    limit=len(destination) if destination else None)
    return list(replies or [])
