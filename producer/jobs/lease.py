"""The producer lease: one process at a time sends a job's rows.

The lease is a Redis key holding ``host:pid:nonce`` with a short expiry, refreshed by its holder
at every step of its pump; a holder that stops (killed, asleep) loses it when it expires.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

from redis.client import Pipeline

from protocol.errors import RequestError

from producer.connection import FarmConnection, as_text

LEASE_SECONDS = 10


class Lease:
    """The lease on one job (``key``); ``held`` while this process holds it."""

    def __init__(self, connection: FarmConnection, key: str, job_id: str, seconds: int = LEASE_SECONDS) -> None:
        self.connection, self.key, self.job_id, self.seconds = connection, key, job_id, seconds
        self.token: str | None = None

    @property
    def held(self) -> bool:
        return self.token is not None

    def acquire(self) -> None:
        """A holder on this host is checked by pid: a dead one is replaced at once, a live one is
        refused at once; a holder elsewhere is waited for until its lease expires."""
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + self.seconds + 1
        redis = self.connection.redis
        with self.connection.reachable():
            while not redis.set(self.key, token, nx=True, ex=self.seconds):
                holder = as_text(redis.get(self.key) or b"")
                alive = holder_alive(holder)
                if alive is False:
                    redis.delete(self.key)
                    continue
                if alive or time.monotonic() > deadline:
                    raise RequestError.for_field("job_id", f"job {self.job_id} is being submitted by another "
                                                 f"producer ({holder}); wait for it, or cancel the job")
                time.sleep(0.2)
        self.token = token

    def try_acquire(self) -> bool:
        """Take the lease if it is free or its holder on this host is dead; never waits (a job
        runner scanning many jobs moves on to the next)."""
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        redis = self.connection.redis
        with self.connection.reachable():
            if not redis.set(self.key, token, nx=True, ex=self.seconds):
                if holder_alive(as_text(redis.get(self.key) or b"")) is not False:
                    return False
                redis.delete(self.key)
                if not redis.set(self.key, token, nx=True, ex=self.seconds):
                    return False
        self.token = token
        return True

    def refresh(self, pipeline: Pipeline) -> None:
        """Queue a read of the holder and a new expiry; pass the holder read to ``keep``."""
        pipeline.get(self.key)
        pipeline.expire(self.key, self.seconds)

    def keep(self, holder: bytes | str | None) -> None:
        """After ``refresh``: raises if another producer holds the lease now."""
        if as_text(holder or b"") == self.token:
            return
        # Expired while this process stood still (a laptop asleep): take it back if still free.
        if holder or not self.connection.redis.set(self.key, self.token or "", nx=True, ex=self.seconds):
            self.token = None
            raise RequestError.for_field("job_id", f"job {self.job_id}: another producer took over this job")

    def release(self) -> None:
        token, self.token = self.token, None
        if token is None:
            return
        try:
            if as_text(self.connection.redis.get(self.key) or b"") == token:
                self.connection.redis.delete(self.key)
        except Exception:  # noqa: BLE001 - Redis gone: the lease expires by itself
            pass


def holder_alive(holder: str) -> bool | None:
    """Whether a lease holder (``host:pid:nonce``) lives; None when this process cannot tell
    (another host, or this very process, whose finishing job releases it in a moment)."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
