"""Bearer keys and per-key limits. Counters live in Redis, so every replica shares them; a key
is stored and labelled only as a short hash of itself, never in clear (logs, metrics, Redis)."""

from __future__ import annotations

import hashlib
import math
import hmac
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

from api.errors import ApiError
from protocol.errors import SettingsError
from protocol.names import PREFIX
from protocol.settings import FarmSettings

LEASE_SECONDS = 3600
"""A request counted as in flight is forgotten after this long even if its replica died holding it."""
WINDOW_SECONDS = 60


def load_keys(settings: FarmSettings) -> frozenset[str]:
    """``FARM_API_KEYS`` plus the lines of ``FARM_API_KEYS_FILE`` (``#`` starts a comment)."""
    keys = {k.strip() for k in settings.api_keys.split(",") if k.strip()}
    if settings.api_keys_file:
        path = Path(settings.api_keys_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as error:
            raise SettingsError(f"FARM_API_KEYS_FILE={path}: cannot be read ({error.strerror})") from None
        keys |= {line.split("#", 1)[0].strip() for line in lines} - {""}
    return frozenset(keys)


def key_id(key: str) -> str:
    """What the farm records of a key: enough to tell keys apart, useless to call with."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class Keys:
    """Checks a request's ``Authorization: Bearer KEY``; with no keys configured, anyone passes."""

    def __init__(self, keys: frozenset[str]) -> None:
        self._ids = {key_id(k): k for k in keys}

    @property
    def required(self) -> bool:
        return bool(self._ids)

    def check(self, authorization: str | None) -> str:
        """The caller's key id (``""`` without keys); ``ApiError(401)`` otherwise."""
        if not self._ids:
            return ""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "missing API key: send the header Authorization: Bearer KEY",
                           None, "missing_api_key")
        candidate = key_id(given.strip())
        known = self._ids.get(candidate)
        if known is None or not hmac.compare_digest(known, given.strip()):
            raise ApiError(401, "invalid API key", None, "invalid_api_key")
        return candidate


@dataclass(frozen=True)
class Lease:
    """One request counted against its key while it runs."""

    key: str
    member: str


class KeyLimits:
    """Per key: at most ``concurrency`` requests in flight and ``rpm`` started in any 60 s
    (sliding: no burst at a minute's turn). Refused requests are not counted."""

    def __init__(self, client: aioredis.Redis, concurrency: int, rpm: int) -> None:
        self.client, self.concurrency, self.rpm = client, concurrency, rpm

    async def acquire(self, key: str) -> Lease | None:
        """Count one request of ``key``, or ``ApiError(429)`` with ``Retry-After``."""
        if not key:
            return None
        started = await self._per_minute(key) if self.rpm else None
        if not self.concurrency:
            return None
        lease = Lease(f"{PREFIX}api:inflight:{key}", uuid.uuid4().hex)
        if (await self._count(lease, LEASE_SECONDS))[0] > self.concurrency:
            await self.release(lease)
            await self.release(started)
            raise ApiError(429, f"this key has {self.concurrency} requests in flight, its limit "
                           "(FARM_API_KEY_CONCURRENCY); retry when one ends", None,
                           "concurrency_limit_exceeded", retry_after=1)
        return lease

    async def release(self, lease: Lease | None) -> None:
        if lease is not None:
            await self.client.zrem(lease.key, lease.member)

    async def _per_minute(self, key: str) -> Lease:
        started = Lease(f"{PREFIX}api:started:{key}", uuid.uuid4().hex)
        count, oldest = await self._count(started, WINDOW_SECONDS)
        if count > self.rpm:
            await self.release(started)
            raise ApiError(429, f"this key started {self.rpm} requests in the last minute, its "
                           "limit (FARM_API_KEY_RPM)", None, "rate_limit_exceeded",
                           retry_after=max(1, math.ceil(oldest + WINDOW_SECONDS - time.time())))
        return started

    async def _count(self, lease: Lease, window: float) -> tuple[int, float]:
        """Add ``lease`` to its set (members scored by start time, older than ``window``
        forgotten): the set's size and its oldest start, in one transaction."""
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        pipe.zremrangebyscore(lease.key, "-inf", now - window)
        pipe.zadd(lease.key, {lease.member: now})
        pipe.zcard(lease.key)
        pipe.zrange(lease.key, 0, 0, withscores=True)
        pipe.expire(lease.key, int(window) + 1)
        replies = await pipe.execute()
        oldest = replies[3][0][1] if replies[3] else now
        return int(replies[2]), float(oldest)
