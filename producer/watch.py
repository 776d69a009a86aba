"""Says on stderr when the farm's Redis stops answering while a command waits on it, and when it
is back: a progress bar that freezes silently during a Redis restart looks like a hung farm."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import redis

from protocol.settings import FarmSettings

CHECK_SECONDS = 1.0
"""How often Redis is pinged: an outage is said within about two of these."""


class RedisWatch:
    """Pings Redis from its own thread, with its own short-timeout connection (the command's
    connections may be blocked in their retries), and says each change once."""

    def __init__(self, settings: FarmSettings, command: str, stream: IO[str] | None = None) -> None:
        self.url, self.shown = settings.redis_url, settings.redacted_redis_url()
        self.command, self.stream = command, stream or sys.stderr
        self.down = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-watch", daemon=True)

    def start(self) -> RedisWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def check(self, client: redis.Redis) -> None:
        try:
            client.ping()
            answered = True
        except redis.RedisError:  # down, or loading its append-only file after a restart
            answered = False
        if answered == self.down:
            self.down = not answered
            state = "unreachable, retrying" if self.down else "back; carrying on"
            print(f"farm {self.command}: Redis at {self.shown} is {state}", file=self.stream, flush=True)

    def _run(self) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=CHECK_SECONDS, socket_timeout=CHECK_SECONDS)
        while not self._stop.wait(CHECK_SECONDS):
            self.check(client)
        client.close()


@contextmanager
def watching(settings: FarmSettings, command: str) -> Iterator[RedisWatch]:
    watch = RedisWatch(settings, command).start()
    try:
        yield watch
    finally:
        watch.stop()
