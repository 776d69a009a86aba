"""A job's Redis store: every key of a job (``protocol.names.JobKeys``) and every read and write
of them, in one place.

Row ``i`` of job ``J`` is the task ``J:i`` on the ``bulk`` queue, and its result is Celery's.
Writes take an optional ``pipeline=`` (as rq's ``Queue`` and ``Job`` do): given one, they queue
their commands on it and the caller executes it, so that several steps make one round trip;
without, they run at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from redis.client import Pipeline
from redis.commands.core import Script

from protocol.names import BULK_QUEUE, JobKeys, model_queue, stream_key, submitted_key
from protocol.schema import GenerationResult

from producer.connection import FarmConnection, as_text

FETCH = 512
"""Results read from Redis in one MGET."""
RECORD = """
local fresh, tokens = 0, 0
for i = 2, #ARGV, 3 do
  local index, kind = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  if redis.call('SETBIT', KEYS[kind], index, 1) == 0 then
    fresh, tokens = fresh + 1, tokens + tonumber(ARGV[i + 2])
  end
  if kind ~= 2 then redis.call('HDEL', KEYS[4], ARGV[i]) end
end
if fresh > 0 and redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('HINCRBY', KEYS[5], 'tokens', tokens)
  redis.call('HSET', KEYS[5], 'last_result', ARGV[1])
end
return redis.call('HMGET', KEYS[5], 'tokens', 'last_result')
"""
"""Record finished rows (KEYS: the ok, failed and cancelled bitmaps in the order of their kinds
1-3, the rows hash, the info hash; ARGV: now, then index, kind, tokens per row) in one atomic step:
SETBIT's old bit tells a row recorded for the first time, whose tokens are then counted."""
Chunk = list[tuple[int, Any]]
"""Rows about to be sent: ``(index, request dict or the FarmError that refused it)``."""


class JobStore:
    """The Redis side of one job."""

    def __init__(self, connection: FarmConnection, job_id: str) -> None:
        self.connection, self.job_id = connection, job_id
        self.keys = JobKeys(job_id)
        self.ttl = connection.settings.result_expires

    def task_id(self, index: int) -> str:
        return f"{self.job_id}:{index}"

    def pipeline(self) -> Pipeline:
        """A pipeline (not a transaction) to pass to the writes as ``pipeline=``."""
        return self.connection.redis.pipeline(transaction=False)

    @contextmanager
    def _batch(self, pipeline: Pipeline | None) -> Iterator[Pipeline]:
        if pipeline is not None:
            yield pipeline
            return
        with self.connection.reachable():
            own = self.pipeline()
            yield own
            own.execute()

    # --- the job's record -------------------------------------------------------------------
    def read(self) -> tuple[dict[str, str], list[bytes]]:
        """The info hash (empty: no such job) and the four bitmaps (sent, ok, failed, cancelled)."""
        with self.connection.reachable():
            pipe = self.pipeline()
            pipe.hgetall(self.keys.info)
            for key in self.keys.bitmaps():
                pipe.get(key)
            raw_info, *bitmaps = pipe.execute()
        return {as_text(k): as_text(v) for k, v in raw_info.items()}, [b or b"" for b in bitmaps]

    def create(self, info: dict[str, str], pipeline: Pipeline | None = None) -> None:
        with self._batch(pipeline) as pipe:
            pipe.hset(self.keys.info, mapping=info)  # type: ignore[arg-type]
            pipe.expire(self.keys.info, self.ttl)

    def state(self, pipeline: Pipeline | None = None) -> str | None:
        """The job's state (running, finished, cancelled; "" for no job). With a pipeline the read
        is queued (its reply, decoded with ``as_text``, is among the pipeline's) and None returned."""
        if pipeline is not None:
            pipeline.hget(self.keys.info, "state")
            return None
        with self.connection.reachable():
            return as_text(self.connection.redis.hget(self.keys.info, "state") or b"")

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        with self._batch(pipeline) as pipe:
            pipe.hset(self.keys.info, "state", state)

    def set_total(self, total: int, pipeline: Pipeline | None = None) -> None:
        with self._batch(pipeline) as pipe:
            pipe.hset(self.keys.info, "total", str(total))

    def cancel(self) -> list[bytes]:
        """Mark the job cancelled; returns its bitmaps as they were (to find the rows in flight)."""
        with self.connection.reachable():
            pipe = self.pipeline()
            self.set_state("cancelled", pipeline=pipe)
            for key in self.keys.bitmaps():
                pipe.get(key)
            _, *bitmaps = pipe.execute()
        return [b or b"" for b in bitmaps]

    # --- sending rows -----------------------------------------------------------------------
    def before_send(self, chunk: Chunk, now: float, pipeline: Pipeline | None = None) -> None:
        """Record a chunk as being sent (``sending``), with its requests (for a retry) and the
        submitted record of each row; every key of the job lives on for ``result_expires``."""
        with self._batch(pipeline) as pipe:
            pipe.sadd(self.keys.sending, *(i for i, _ in chunk))
            for index, request in chunk:
                if isinstance(request, dict):
                    meta = {"submitted_at": now, "job": self.job_id, "index": index}
                    pipe.set(submitted_key(self.task_id(index)), json.dumps(meta), ex=self.ttl)
                    pipe.hset(self.keys.rows, str(index), json.dumps(request))
            for key in self.keys.all():
                pipe.expire(key, self.ttl)

    def mark_sent(self, rows: list[int], pipeline: Pipeline | None = None) -> None:
        """The chunk's messages are enqueued: its rows move from ``sending`` to ``sent``."""
        with self._batch(pipeline) as pipe:
            for index in rows:
                pipe.setbit(self.keys.sent, index, 1)
            pipe.srem(self.keys.sending, *rows)

    def settle_sending(self) -> list[int]:
        """Rows a killed producer was enqueueing: sent if a trace of their message exists (result,
        stream, queued or reserved message), else they are to be sent again. Returns the sent ones."""
        with self.connection.reachable():
            rows = sorted(int(i) for i in self.connection.redis.smembers(self.keys.sending))
            if not rows:
                return []
            queued = self._in_broker(rows)
            pipe = self.pipeline()
            for index in rows:
                pipe.exists(self.connection.result_key(self.task_id(index)), stream_key(self.task_id(index)))
            traces = pipe.execute()
            sent = [i for i, n in zip(rows, traces, strict=True) if n or self.task_id(i) in queued]
            pipe = self.pipeline()
            for index in sent:
                pipe.setbit(self.keys.sent, index, 1)
            pipe.delete(self.keys.sending)
            pipe.execute()
        return sent

    def lost(self, rows: list[int]) -> list[int]:
        """Rows sent whose message is nowhere: no stored result, in no queue, reserved by no
        worker. A Redis restarted from its append-only file may have lost them with its last
        second of writes (or a worker's reserved messages with a failed restore); they are to
        be sent again. The broker is read before the results: a message leaves it only once
        its result is stored, so a row between the two reads is never taken for lost."""
        if not rows:
            return []
        queued = self._in_broker(rows)
        return [i for i, result in self.results(rows) if result is None and self.task_id(i) not in queued]

    def _in_broker(self, rows: list[int]) -> set[str]:
        """Ids of this job's messages queued or reserved, over the bulk queues of ``rows``' models."""
        queued: set[str] = set()
        for queue in self._queues(rows):
            queued |= self.connection.broker_task_ids(queue, f"{self.job_id}:")
        return queued

    def _queues(self, rows: list[int]) -> set[str]:
        """The bulk queues of these rows' models (their requests were stored before sending)."""
        raws = self.connection.redis.hmget(self.keys.rows, [str(i) for i in rows])
        return {model_queue(BULK_QUEUE, json.loads(raw).get("model")) for raw in raws if raw} or {BULK_QUEUE}

    # --- results ----------------------------------------------------------------------------
    def results(self, rows: list[int]) -> list[tuple[int, GenerationResult | None]]:
        """The stored result of each row (None: not over yet), one MGET per ``FETCH`` rows."""
        found: list[tuple[int, GenerationResult | None]] = []
        for start in range(0, len(rows), FETCH):
            part = rows[start:start + FETCH]
            ids = [self.task_id(i) for i in part]
            with self.connection.reachable():
                raws = self.connection.redis.mget([self.connection.result_key(t) for t in ids])
            found += [(i, self.connection.decode_result(t, raw)) for i, t, raw in zip(part, ids, raws, strict=True)]
        return found

    def record(self, finished: Sequence[tuple[int, int] | tuple[int, int, int]], pipeline: Pipeline | None = None,
               now: float | None = None) -> None:
        """Outcomes ``(index, OK|FAILED|CANCELLED[, completion tokens])`` into the bitmaps (a failed
        row's request is kept for a retry); the job's ``tokens`` and ``last_result`` (``now``) count
        only rows recorded for the first time, so that processes following the same job count each
        row once. The reply (in the pipeline's, if given) is what ``parse_counts`` reads."""
        keys = [self.keys.ok, self.keys.failed, self.keys.cancelled, self.keys.rows, self.keys.info]
        rows = [(index, kind, tokens[0] if tokens else 0) for index, kind, *tokens in finished]
        args = [repr(time.time() if now is None else now), *(str(n) for row in rows for n in row)]
        with self._batch(pipeline) as pipe:
            self._record_script(keys=keys, args=args, client=pipe)

    @property
    def _record_script(self) -> Script:
        return self.connection.redis.register_script(RECORD)

    # --- retrying    # --- retrying ---------------------------------------------------------------------------
    def requests(self, rows: list[int]) -> list[tuple[int, dict[str, Any]]]:
        """The stored requests of rows (those without one are left out)."""
        if not rows:
            return []
        with self.connection.reachable():
            raws = self.connection.redis.hmget(self.keys.rows, [str(i) for i in rows])
        return [(i, json.loads(raw)) for i, raw in zip(rows, raws, strict=True) if raw]

    def reset(self, rows: list[int], pipeline: Pipeline | None = None) -> None:
        """Forget the failures so that the rows read as unsent and the worker runs them again."""
        with self._batch(pipeline) as pipe:
            for index in rows:
                task_id = self.task_id(index)
                pipe.delete(self.connection.result_key(task_id), stream_key(task_id))
                pipe.setbit(self.keys.failed, index, 0)
                pipe.setbit(self.keys.sent, index, 0)
            self.set_state("running", pipeline=pipe)


def parse_counts(reply: list[bytes | str | None]) -> tuple[int, float | None]:
    """The job's completion tokens and the time of its last result, from ``record``'s reply."""
    tokens, last = (as_text(v) if v is not None else None for v in reply)
    return int(tokens or 0), float(last) if last else None


def new_info(params: dict[str, Any], total: int | None, fingerprint: str | None) -> dict[str, str]:
    """The info hash of a new job."""
    return {"total": str(-1 if total is None else total), "params": json.dumps(params, sort_keys=True),
            "created": str(time.time()), "state": "running", "fingerprint": fingerprint or ""}
