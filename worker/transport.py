"""kombu's Redis transport, hardened for a worker that reads a queue anyone with Redis access
can write to.

Stock kombu decodes each popped message envelope inside the consumer loop: a malformed envelope
(not json, or missing fields) raises there and Celery stops the worker as "Unrecoverable error".
Here such a message is logged and dropped (it was already popped), and the worker keeps serving.
Pickle is refused earlier by Celery itself (``accept_content=["json"]``).

Also: when Redis goes away (a restart), Celery closes the broken channel and kombu tries to put
the channel's unacknowledged messages back with a connection it has just torn down; the
resulting AttributeError stopped the worker ("Unrecoverable error"). Those messages are still in
Redis's unacked index, and come back after the visibility timeout, so the attempt is dropped
with a log line and the worker reconnects.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class SafeQoS(kombu_redis.QoS):  # type: ignore[misc]
    def restore_unacked(self, client: Any = None) -> None:
        try:
            super().restore_unacked(client)
        except (AttributeError, *kombu_redis.get_redis_error_classes().connection_errors) as error:
            log.warning("unacknowledged messages not restored now (%r): they return after the "
                        "visibility timeout", error)
            self._delivered.clear()


class SafeChannel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = SafeQoS

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            log.error("dropped a malformed message from the queue (not a valid kombu envelope): %r", error)
            return True


class SafeTransport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = SafeChannel


def install() -> None:
    """Make ``redis://`` URLs use the hardened transport in this process (the worker's)."""
    TRANSPORT_ALIASES["redis"] = f"{__name__}:SafeTransport"
    TRANSPORT_ALIASES["rediss"] = f"{__name__}:SafeTransport"
