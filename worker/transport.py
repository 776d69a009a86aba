"""kombu's Redis transport, hardened for a worker that reads a queue anyone with Redis access
can write to.

Stock kombu decodes each popped message envelope inside the consumer loop: a malformed envelope
(not json, or missing fields) raises there and Celery stops the worker as "Unrecoverable error".
Here such a message is logged and dropped (it was already popped), and the worker keeps serving.
Pickle is refused earlier by Celery itself (``accept_content=["json"]``).
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class SafeChannel(kombu_redis.Channel):  # type: ignore[misc]
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
