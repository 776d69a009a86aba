"""``farm flower``: Flower (Celery's monitoring UI) on the farm's broker, with the farm's rules.

- Task events on (workers send them; Flower also asks workers to enable them).
- ``--basic-auth`` (from ``FARM_FLOWER_AUTH``) is required when Flower binds anything but
  loopback: Flower can revoke tasks and shut workers down.
- Prometheus ``/metrics`` is always served (Flower 2 serves it without auth). Flower's ``/api``
  needs auth; on loopback without auth it is opened with ``FLOWER_UNAUTHENTICATED_API``.
- The password goes to Flower through its environment, never its command line (``ps`` shows that).
- Its log says what is so: the broker URL as it is, and no "Inspect method … failed" for the
  workers of a farm still starting (``UnansweredWhileNoWorker``).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Callable

from protocol.errors import FarmUnavailable, SettingsError
from protocol.settings import FarmSettings

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; ``""`` and ``0.0.0.0`` mean every interface."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_auth(host: str, auth: str) -> None:
    """Refuse an exposed Flower without basic auth, or with a malformed one."""
    if auth and (":" not in auth or not auth.split(":", 1)[0] or not auth.split(":", 1)[1]):
        raise SettingsError("FARM_FLOWER_AUTH must be user:password")
    if not auth and not is_loopback(host):
        raise SettingsError(
            f"Flower would listen on {host or 'every interface'} without a password: set "
            "FARM_FLOWER_AUTH=user:password (basic auth) or bind it to 127.0.0.1")


def flower_argv(host: str, port: int) -> list[str]:
    """Arguments of ``celery flower`` (the Celery app, with the broker, is passed in-process)."""
    return ["flower", f"--address={host}", f"--port={port}", "--enable_events=True", "--purge_offline_workers=300"]


def flower_env(host: str, auth: str) -> dict[str, str]:
    """Environment variables Flower reads its secrets and API policy from."""
    if auth:
        return {"FLOWER_BASIC_AUTH": auth}
    # Loopback only (check_auth refused the rest): the farm's tests and `farm status` may use /api.
    return {"FLOWER_UNAUTHENTICATED_API": "true"}


BROKER_LINES = {"flower.command": "Broker: %s", "kombu.mixins": "Connected to %s"}
"""Flower's log lines that name the broker, by logger."""


class BrokerUrlAsItIs(logging.Filter):
    """Flower logs ``Broker: redis://:**@host``: kombu masks a password even where there is none.
    The farm's own redaction shows the URL as it is, its password (if any) as ``***``."""

    def __init__(self, shown: str) -> None:
        super().__init__()
        self.shown = shown

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in BROKER_LINES.values():
            record.args = (self.shown,)
        return True


INSPECT_UNANSWERED = "Inspect method %s failed"
"""Flower's warning (``flower.inspector``) for an inspect broadcast no worker answered in time."""
NO_WORKER_YET = "no worker online yet: Flower lists each worker as it comes online"


class UnansweredWhileNoWorker(logging.Filter):
    """Flower inspects the workers once at start (``stats``, ``active_queues``, ``registered``,
    ``conf``) and warns "Inspect method … failed" for each broadcast nobody answered. ``farm up``
    starts Flower while its workers still load their model, so nobody can answer yet: four
    alarming lines about nothing (Flower learns of each worker from its events once it is online,
    and inspects it when its page is opened). So the warning becomes one plain line while no
    worker's heartbeat says ready; with a worker online an unanswered inspect is a real fault
    (a worker that cannot encode its reply, say) and the warning stays."""

    def __init__(self, workers_ready: Callable[[], bool]) -> None:
        super().__init__()
        self.workers_ready = workers_ready
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != INSPECT_UNANSWERED or self._any_ready():
            return True
        if self.said:
            return False
        self.said = True
        record.msg, record.args, record.levelno, record.levelname = NO_WORKER_YET, (), logging.INFO, "INFO"
        return True

    def _any_ready(self) -> bool:
        try:
            return self.workers_ready()
        except FarmUnavailable:  # Redis unreachable: say nothing about the workers, keep Flower's line
            return True


def heartbeats_ready(settings: FarmSettings) -> Callable[[], bool]:
    """Whether some worker's heartbeat says ready (it consumes, so it answers broadcasts)."""
    from producer.client import FarmClient

    client = FarmClient(settings=settings)
    return lambda: any(beat.ready for beat in client.heartbeats())


def _parser(settings: FarmSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farm flower", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=settings.flower_port, help="port (FARM_FLOWER_PORT)")
    return parser


def main(argv: list[str] | None = None) -> int:
    settings = FarmSettings.from_env()
    args = _parser(settings).parse_args(argv)
    try:
        check_auth(args.address, settings.flower_auth)
    except SettingsError as error:
        print(f"farm flower: {error}", file=sys.stderr)
        return 2
    os.environ.update(flower_env(args.address, settings.flower_auth))
    from protocol.celery_app import make_celery

    for logger in BROKER_LINES:
        logging.getLogger(logger).addFilter(BrokerUrlAsItIs(settings.redacted_redis_url()))
    logging.getLogger("flower.inspector").addFilter(UnansweredWhileNoWorker(heartbeats_ready(settings)))
    app = make_celery(settings, name="batchfarm-flower")
    return int(app.start(flower_argv(args.address, args.port)) or 0)


if __name__ == "__main__":
    sys.exit(main())
