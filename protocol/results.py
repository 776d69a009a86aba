"""The result store: Celery's Redis backend, keeping the first finished result of each request.

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
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from protocol.names import duplicates_key

BACKEND = f"{__name__}:FirstResultBackend"
"""Celery's name for it: ``f"{BACKEND}+{redis_url}"`` as the result backend URL."""

# KEYS: the result key. ARGV: the encoded meta, expiry in seconds (0 for none). Returns false
# when stored, else the result already there.
STORE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return current end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return false
"""


class FirstResultBackend(RedisBackend):  # type: ignore[misc]
    """Stores a task's state unless a SUCCESS is stored already (atomically)."""

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
        if current is not None and _result_of(current) != _result_of(encoded):
            self.client.incr(duplicates_key())


def _result_of(raw: bytes | str) -> Any:
    try:
        return json.loads(raw).get("result")
    except (ValueError, AttributeError):
        return None
