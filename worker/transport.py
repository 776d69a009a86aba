"""kombu's Redis transport, hardened for a worker that reads a queue anyone with Redis access
can write to.

Stock kombu decodes each popped message envelope inside the consumer loop: a malformed envelope
(not json, or missing fields) raises there and Celery stops the worker as "Unrecoverable error".
Here such a message is logged and dropped (it was already popped), and the worker keeps serving.
Pickle is refused earlier by Celery itself (``accept_content=["json"]``).

Also: when Redis goes away (a restart), Celery closes the broken channel and kombu tries to put
the channel's unacknowledged messages back with a connection it has just torn down; the
resulting AttributeError stopped the worker ("Unrecoverable error"); so did the late ack of a task
that was running on the closed channel (it now goes through the process's own Redis client). Those messages are still in
Redis's unacked index, under the closed channel's own owner name, which the worker no longer keeps
alive: a sweeper returns them within seconds (``protocol/ownership.py``). So the attempt is
dropped with a log line and the worker reconnects, with a new channel and a new owner name.

And: stock kombu takes a message with ``BRPOP`` and only then, from Python, records it in the
unacked index that redelivers a dead worker's messages. A worker killed in between (or while
the popped reply waits in its socket because the prefetch window is full) loses that message
for good: kombu's Redis transport is at-most-once there. Here the pop and the unacked record
are one Lua script, so a message is always either in its queue or in the unacked index. The
script cannot block, so after an empty pop the worker's event loop waits ``IDLE_WAIT`` (a timer)
before the next one. (A server-side wait such as ``BLPOP key 0.02`` would not do: Redis checks
blocking timeouts at its ``hz`` rate, 10 per second by default, so it would last ~100 ms.)
"""

from __future__ import annotations

import logging
from queue import Empty
from time import monotonic
from typing import Any

import redis
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis
from redis.exceptions import ResponseError

from protocol import ownership
from protocol.names import owners_key

log = logging.getLogger(__name__)

#: Seconds an idle worker waits between pops of empty queues: the most an interactive request
#: waits for an idle worker to notice it.
IDLE_WAIT = 0.02
#: A key nobody writes; blocking on it is a server-side sleep, for consumers without an event loop.
IDLE_KEY = "batchfarm:idle"

# KEYS: unacked index, unacked hash, owners hash, then the queues in priority order; ARGV: the
# owner ('' for none). Pops the first message, records it as unacked (score = now, as kombu's
# QoS.append does) and who holds it (protocol/ownership.py) in the same atomic step, and
# returns {queue, message}. A message that is not a kombu envelope is returned unrecorded (the
# Python side drops it with a log line). The envelope is stored as sent, never re-encoded.
POP_SCRIPT = """
local now = redis.call('TIME')
local score = tonumber(now[1]) + tonumber(now[2]) / 1000000
for i = 4, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, envelope = pcall(cjson.decode, item)
    if ok and type(envelope) == 'table' and type(envelope['properties']) == 'table' then
      local tag = envelope['properties']['delivery_tag']
      local info = envelope['properties']['delivery_info']
      if type(tag) == 'string' and type(info) == 'table' then
        redis.call('ZADD', KEYS[1], score, tag)
        redis.call('HSET', KEYS[2], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'])
                   .. ',' .. cjson.encode(info['routing_key']) .. ']')
        if ARGV[1] ~= '' then redis.call('HSET', KEYS[3], tag, ARGV[1] .. '\\n' .. KEYS[i]) end
      end
    end
    return {KEYS[i], item}
  end
end
return false
"""


class SafeQoS(kombu_redis.QoS):  # type: ignore[misc]
    """Also owner-aware: an ack forgets a message only if this worker still holds it, and a
    restore (at shutdown, a requeue, the visibility timeout) never takes a message from a live
    worker that holds it now."""

    def ack(self, delivery_tag: str) -> None:
        if not self.channel.farm_owner:
            return super().ack(delivery_tag)  # type: ignore[no-any-return]
        try:
            self._forget(delivery_tag)
        except (AttributeError, redis.RedisError, *kombu_redis.get_redis_error_classes().connection_errors) as error:
            # An ack that cannot reach Redis must not stop the worker (Celery calls it "Unrecoverable
            # error"): the message stays under this channel's claim, which lapses, and is run again.
            # Its first result is the one kept (protocol/results.py).
            log.warning("acknowledgement of %s not recorded now (%r): it is run again once this channel's "
                        "claim lapses", delivery_tag, error)
        virtual.QoS.ack(self, delivery_tag)
        return None

    def _forget(self, delivery_tag: str) -> None:
        claims = self.channel.farm_claims
        if self.channel.connection is None and claims is not None:
            # The channel was closed under a running task (Redis restarted; the worker carries on
            # with a new channel): its pool is gone, so the task's late ack goes through the
            # process's own client, still for the owner that popped the message.
            ownership.forget(claims.client, delivery_tag, self.channel.farm_owner, self._keys())
            return
        with self.channel.conn_or_acquire() as client:
            ownership.forget(client, delivery_tag, self.channel.farm_owner, self._keys())

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue or not self.channel.farm_owner:
            return super().reject(delivery_tag, requeue)  # type: ignore[no-any-return]
        return self.ack(delivery_tag)

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        with self.channel.conn_or_acquire(client) as client:
            tag = tag.decode() if isinstance(tag, bytes) else tag
            if ownership.restore(client, tag, self.channel.farm_owner, self._keys(), leftmost) is None:
                super().restore_by_tag(tag, client, leftmost)

    def _keys(self) -> ownership.UnackedKeys:
        return ownership.UnackedKeys(self.unacked_index_key, self.unacked_key)

    def restore_unacked(self, client: Any = None) -> None:
        try:
            super().restore_unacked(client)
        except (AttributeError, *kombu_redis.get_redis_error_classes().connection_errors) as error:
            log.warning("unacknowledged messages not restored now (%r): they return once this "
                        "channel's claim lapses", error)
            self._delivered.clear()


class SafeChannel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = SafeQoS
    _atomic_pop = True  # off for a key prefix, or a server without Lua: stock BRPOP then
    _idle = False  # without an event loop: the last pop found every queue empty, sleep first
    _idle_until = 0.0  # with the worker's event loop: no pop before this (after an empty one)
    _sent = "BRPOP"
    farm_owner = ""
    """The owner name its pops record (``protocol.ownership``); empty: pops record no owner."""
    farm_claims: ownership.Liveness | None = None
    """The worker process's claims: given, the channel claims under a name of its own, for as long
    as it is open. A channel dropped with Redis (a restart) takes its delivered messages with it,
    while Redis still lists them as reserved: they must not stay held by the live process."""
    from_transport_options = (*kombu_redis.Channel.from_transport_options,  # type: ignore[assignment]
                              "farm_owner", "farm_claims")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.farm_claims is not None:
            self.farm_owner = self.farm_claims.claim()

    def close(self) -> None:
        if self.farm_claims is not None:  # first: whatever the close meets, the claim lapses
            self.farm_claims.release(self.farm_owner)
        super().close()

    def _brpop_start(self, timeout: Any = None) -> None:
        if not self._atomic_pop or self.global_keyprefix:
            self._sent = "BRPOP"
            super()._brpop_start(timeout)
            return
        if self._event_loop() is not None and monotonic() < self._idle_until:
            return  # waiting after an empty pop (a timer wakes the loop); nothing in flight
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        if self._idle:  # no event loop (a synchronous consumer): wait on the server instead
            self._sent = "BLPOP"
            self.client.connection.send_command("BLPOP", IDLE_KEY, IDLE_WAIT)
        else:
            self._sent = "EVAL"
            self.client.connection.send_command("EVAL", POP_SCRIPT, 3 + len(keys), self.unacked_index_key,
                                                self.unacked_key, owners_key(), *keys, self.farm_owner)

    def _brpop_read(self, **options: Any) -> bool:
        # kombu's reader serves all three replies: the script returns {queue, message} like
        # BRPOP, and nil (an empty pop, or the end of a BLPOP sleep) becomes ``Empty``.
        sent = self._sent
        try:
            return bool(super()._brpop_read(**options))
        except Empty:
            if sent == "EVAL":
                self._rest()
            else:  # a BLPOP sleep ended (or stock BRPOP timed out): pop next
                self._idle = False
            raise
        except ResponseError as error:
            if sent != "EVAL":
                raise
            log.warning("atomic pop refused by the server (%s); falling back to BRPOP", error)
            self._atomic_pop = False
            raise Empty() from error
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            log.error("dropped a malformed message from the queue (not a valid kombu envelope): %r", error)
            return True

    def _rest(self) -> None:
        """After an empty pop, no pop for ``IDLE_WAIT``. Without an event loop the next command
        is a server-side sleep. With the worker's loop, a deadline: the timer only wakes the
        loop, so a timer lost in a reset delays the next pop by a tick at most. Set here, before
        the loop computes its next poll timeout (kombu's hub does that before its tick
        callbacks, where the next pop is sent)."""
        loop = self._event_loop()
        if loop is None:
            self._idle = True
            return
        self._idle_until = monotonic() + IDLE_WAIT
        loop.call_later(IDLE_WAIT, _wake)

    def _event_loop(self) -> Any:
        return getattr(self.connection, "event_loop", None)


def _wake() -> None:
    """An idle timer's callback: firing wakes the event loop, whose next tick pops again."""


class SafeTransport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = SafeChannel
    event_loop: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self.event_loop = loop
        super().register_with_event_loop(connection, loop)


def install() -> None:
    """Make ``redis://`` URLs use the hardened transport in this process (the worker's)."""
    TRANSPORT_ALIASES["redis"] = f"{__name__}:SafeTransport"
    TRANSPORT_ALIASES["rediss"] = f"{__name__}:SafeTransport"
