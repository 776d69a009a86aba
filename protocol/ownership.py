"""Who holds each reserved message, and giving a dead holder's messages back within seconds.

kombu's Redis transport keeps every reserved (unacknowledged) message in its ``unacked`` hash and
``unacked_index`` sorted set, and puts it back only once it is older than the visibility timeout:
hours, since a live worker's long batches must not be redelivered under it. Here the worker's
atomic pop (``worker/transport.py``) also records the *owner* of each message in
``farm:owners`` (delivery tag -> ``<owner>\\n<queue key>``), and each worker process keeps a short
liveness key (``farm:alive:<owner>``) fresh while it runs. A sweeper (in every worker and in
``farm up``) returns the messages whose owner's liveness lapsed: a dead process's messages come
back in seconds, a live one's never, however long its batches run.

Every restore is one Lua script that checks, atomically, that the record is unchanged and its
owner still dead, then removes the message from kombu's indices and pushes it back to the end
the workers pop next (the front of its queue), marked redelivered as kombu marks it. So any
number of concurrent sweepers restore each message once. A message without an owner (kombu's
own path) is left to kombu's visibility timeout, the last resort.

A claim lasts as long as the broker channel that popped the messages, not the process: when Redis
restarts, kombu drops the worker's channel with the messages it had delivered, but Redis (from its
append-only file) still lists them as reserved. Each channel therefore claims under a name of its
own (``Liveness.claim``), which is no longer refreshed once the channel closes; its messages come
back within seconds, while the worker carries on with a new channel and a new name.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import redis

from protocol.names import alive_key, owners_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnackedKeys:
    """kombu's keys of reserved messages (its defaults; a channel may name its own)."""

    index: str = "unacked_index"
    messages: str = "unacked"


def liveness_ttl(heartbeat_seconds: float) -> float:
    """Seconds a worker's claim lasts without a refresh: three heartbeats, at least 3 s."""
    return max(3.0, 3 * heartbeat_seconds)


def refresh_seconds(heartbeat_seconds: float) -> float:
    """How often a worker refreshes its claim and sweeps: twice a heartbeat, at least once a second."""
    return max(0.1, min(1.0, heartbeat_seconds / 2))


def new_owner(worker_name: str) -> str:
    """A name for this process's claims. Not the worker name alone: ``farm up`` restarts a killed
    worker under the same name within seconds, and the new process must not keep alive the claims
    of the dead one."""
    return f"{worker_name}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def parse_record(record: bytes | str) -> tuple[str, str]:
    """``(owner, queue key)`` of an owner record."""
    owner, _, queue = _text(record).partition("\n")
    return owner, queue


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# KEYS: unacked index, unacked hash, owners hash, queue key, the owner's alive key.
# ARGV: tag, the owner record read, the unacked entry read ('' if none), the payload to push,
# '1' if the caller is the owner (no liveness check), '1' to push to the back (LPUSH).
RESTORE_SCRIPT = """
if (redis.call('HGET', KEYS[3], ARGV[1]) or '') ~= ARGV[2] then return 0 end
if (redis.call('HGET', KEYS[2], ARGV[1]) or '') ~= ARGV[3] then return 0 end
if ARGV[5] ~= '1' and redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if ARGV[3] == '' then return 0 end
if ARGV[6] == '1' then redis.call('LPUSH', KEYS[4], ARGV[4]) else redis.call('RPUSH', KEYS[4], ARGV[4]) end
return 1
"""

# KEYS: unacked index, unacked hash, owners hash. ARGV: tag, owner. An ack: forgets the message
# unless another worker holds it now (it was restored while this one was cut off, and taken again).
FORGET_SCRIPT = """
local record = redis.call('HGET', KEYS[3], ARGV[1])
if record and string.sub(record, 1, #ARGV[2] + 1) ~= ARGV[2] .. '\\n' then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""


def forget(client: redis.Redis, tag: str, owner: str, keys: UnackedKeys = UnackedKeys()) -> bool:
    """Acknowledge ``tag`` for ``owner``; False if another worker holds it now."""
    return bool(client.eval(FORGET_SCRIPT, 3, keys.index, keys.messages, owners_key(), tag, owner))


def restore(client: redis.Redis, tag: str, me: str = "", keys: UnackedKeys = UnackedKeys(),
            leftmost: bool = False) -> bool | None:
    """Put the reserved message ``tag`` back on its queue if it is ``me``'s or its owner is dead.
    True: restored; False: not (held by a live worker, or changed meanwhile); None: it has no
    owner record (kombu's own restore applies)."""
    pipe = client.pipeline(transaction=False)
    pipe.hget(owners_key(), tag)
    pipe.hget(keys.messages, tag)
    record, raw = pipe.execute()
    if record is None:
        return None
    owner, queue = parse_record(record)
    payload = redelivered(raw) if raw is not None else ""
    if payload is None:
        return False  # not a kombu record: left to the visibility timeout
    return bool(client.eval(RESTORE_SCRIPT, 5, keys.index, keys.messages, owners_key(), queue, alive_key(owner),
                            tag, record, raw or "", payload, "1" if owner == me else "0", "1" if leftmost else "0"))


def redelivered(raw: bytes) -> str | None:
    """The message of an unacked entry, marked redelivered as kombu's own restore marks it (the
    worker counts redeliveries by that flag)."""
    try:
        message = json.loads(raw)[0]
        message["headers"]["redelivered"] = True
        message["properties"]["delivery_info"]["redelivered"] = True
    except (ValueError, TypeError, KeyError, IndexError) as error:
        log.error("unacked entry is not a kombu message, left to the visibility timeout: %r", error)
        return None
    return json.dumps(message)


def sweep(client: redis.Redis, ttl: float, keys: UnackedKeys = UnackedKeys()) -> int:
    """Restore every message whose owner is dead; returns how many. Right after a Redis restart
    (up for less than ``ttl``) nothing is swept: claims that expired while Redis was down belong
    to workers that have not had the time to renew them yet."""
    if float(client.info("server").get("uptime_in_seconds", 0)) < ttl:
        return 0
    held: dict[str, list[str]] = defaultdict(list)
    for tag, record in client.hgetall(owners_key()).items():
        held[parse_record(record)[0]].append(_text(tag))
    restored = 0
    for owner, tags in held.items():
        if not client.exists(alive_key(owner)):
            count = sum(bool(restore(client, tag, keys=keys)) for tag in tags)
            if count:
                log.warning("returned %d message(s) of %s to their queues (its liveness lapsed)", count, owner)
            restored += count
    return restored


class Sweeper:
    """Sweeps at most every ``period`` seconds when polled (``farm up``'s supervision loop)."""

    def __init__(self, client: redis.Redis, heartbeat_seconds: float) -> None:
        self.client = client
        self.ttl, self.period = liveness_ttl(heartbeat_seconds), refresh_seconds(heartbeat_seconds)
        self._next = 0.0

    def poll(self) -> int:
        now = time.monotonic()
        if now < self._next:
            return 0
        self._next = now + self.period * 0.9  # a loop that polls every period never skips one
        try:
            return sweep(self.client, self.ttl)
        except redis.RedisError as error:  # Redis restarting: sweep again next time
            log.debug("sweep failed: %s", error)
            return 0


class Liveness:
    """A worker process's claims on its messages: alive keys, refreshed by a thread that also
    sweeps the messages of dead workers. Started before the worker takes any message. ``owner``
    is the process's name; each broker channel claims under a name of its own (``claim``)."""

    def __init__(self, client: redis.Redis, worker_name: str, heartbeat_seconds: float) -> None:
        self.client, self.owner = client, new_owner(worker_name)
        self.sweeper = Sweeper(client, heartbeat_seconds)
        self._claims = {self.owner}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def __json__(self) -> str:
        """How kombu's json encoder shows this object. It sits in the broker's transport options
        (``transport_options``), which a worker's ``stats`` reply carries: without this the reply
        cannot be encoded, the worker logs a "Control command error" and resets its control
        consumer, and every inspect broadcast then (Flower's four at start: ``stats``,
        ``active_queues``, ``registered``, ``conf``) goes unanswered."""
        return f"<Liveness of {self.owner}>"

    def start(self) -> Liveness:
        self.refresh()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def claim(self) -> str:
        """A new owner name, kept alive until ``release``d (a channel's, for its lifetime)."""
        owner = f"{self.owner}/{uuid.uuid4().hex[:8]}"
        with self._lock:
            self._claims.add(owner)
        self.refresh()
        return owner

    def release(self, owner: str) -> None:
        """Stop refreshing ``owner``: the messages it still holds are swept once its key lapses."""
        with self._lock:
            self._claims.discard(owner)

    def refresh(self) -> None:
        with self._lock:
            owners = sorted(self._claims)
        try:
            pipe = self.client.pipeline(transaction=False)
            for owner in owners:
                pipe.set(alive_key(owner), "1", px=int(self.sweeper.ttl * 1000))
            pipe.execute()
        except redis.RedisError as error:  # Redis restarting: refresh again next time
            log.warning("liveness not refreshed: %s", error)

    def _run(self) -> None:
        while not self._stop.wait(self.sweeper.period):
            self.refresh()
            self.sweeper.poll()


def transport_options(liveness: Liveness) -> dict[str, Any]:
    """What the worker adds to ``broker_transport_options`` so that each of its channels' pops
    record an owner of that channel's own (``worker/transport.py``)."""
    return {"farm_owner": liveness.owner, "farm_claims": liveness}
