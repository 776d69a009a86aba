"""The result store: Celery's Redis backend, keeping the first finished result of each request.

A request ends in one of Celery's ready states: ``SUCCESS`` (finished: ``length`` or ``stop``),
``FAILURE`` (an error) or ``REVOKED`` (cancelled), so that Flower, reading Celery's events, shows
each as what it is. A cancelled request that ran keeps what it generated: its ``REVOKED`` record's
exception (``TaskRevokedError("cancelled", result)``, ``cancelled_error``) carries the result so
far, which ``result_of_revoked`` reads back. Celery's own revoke of a queued message stores
``TaskRevokedError("revoked")``: no result (the request never ran).

A worker cut off from Redis long enough loses its claim on its messages (protocol/ownership.py);
another worker runs them again. When the first comes back and stores its own result, Celery's
backend would check "already SUCCESS?" and then write, two steps another writer can fall
between. Here the check and the write are one Lua script: the first finished result stays, a
later one is dropped, and the drop is counted in ``farm:duplicates`` (unless it is the same
result again: a redelivered message of a finished request returns the stored result).
"""

from __future__ import annotations

import json
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError, TaskRevokedError
from kombu.utils.encoding import bytes_to_str

from protocol.names import duplicates_key

BACKEND = f"{__name__}:FirstResultBackend"
"""Celery's name for it: ``f"{BACKEND}+{redis_url}"`` as the result backend URL."""

CANCELLED = "cancelled"
"""The reason in a cancelled request's ``TaskRevokedError`` (Celery's own revoke says ``revoked``)."""
FINAL_STATES = (states.SUCCESS, states.REVOKED)
"""States a later store never replaces: a finished or cancelled request stays so (a FAILURE may
be replaced: a bulk job's retry sends a failed row again under its id)."""

# KEYS: the result key. ARGV: the encoded meta, expiry in seconds (0 for none). Returns false
# when stored, else the result already there.
STORE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and (meta['status'] == 'SUCCESS' or meta['status'] == 'REVOKED') then
    return current
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return false
"""


def cancelled_error(result: dict[str, Any]) -> TaskRevokedError:
    """What a cancelled request stores as its ``REVOKED`` record: the result so far inside."""
    return TaskRevokedError(CANCELLED, result)


def result_of_revoked(value: Any) -> dict[str, Any] | None:
    """The result a ``REVOKED`` record carries (``cancelled_error``); None for Celery's own revoke."""
    if isinstance(value, BaseException):
        return next((dict(arg) for arg in value.args if isinstance(arg, dict)), None)
    return None


class FirstResultBackend(RedisBackend):  # type: ignore[misc]
    """Stores a task's state unless a SUCCESS or REVOKED is stored already (atomically)."""

    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None,
                      request: Any = None, **kwargs: Any) -> Any:
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        self.ensure(self._store_first, (self.get_key_for_task(task_id), meta, expires))
        return result

    def _store_first(self, key: bytes, meta: dict[str, Any], expires: int | None) -> None:
        encoded = self.encode(meta)
        if len(encoded) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend")
        current = self.client.eval(STORE_SCRIPT, 1, key, encoded, int(expires or 0))
        # A revoke arriving after the end ran nothing again: only a second run's result counts.
        if current is not None and meta["status"] != states.REVOKED and _result_of(current) != _result_of(encoded):
            self.client.incr(duplicates_key())


def _result_of(raw: bytes | str) -> Any:
    try:
        return json.loads(raw).get("result")
    except (ValueError, AttributeError):
        return None
