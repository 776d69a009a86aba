"""Following one request: its stream of events and Celery's stored result, to the end.

``Follower`` is the logic with no I/O (as h11 is for HTTP): it says which read comes next
(``Step``) and takes what the read returned. ``follow`` drives it with blocking reads; an
asyncio server can drive the same ``Follower`` with its own awaits.

Two ways to follow:
- the stream (``until_result=False``): every event up to ``end``; a task that is over without
  any stream (refused before it reached the engine) ends it too;
- the result (``until_result=True``): Celery's stored result, looked at before every wait on the
  stream (a finished request is answered at once); after ``end`` it is a moment away.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from typing import Any

from protocol.errors import FarmUnavailable

from producer.connection import READY_STATES, Events, FarmConnection, Outage

PAUSE_SECONDS = 0.005
"""Between looks at the stored result once the stream has ended (it is written a moment after)."""


class Step(enum.Enum):
    READ_EVENTS = "read events"
    READ_STATE = "read the task's state"
    PAUSE = "pause"
    DONE = "done"


class Follower:
    """What is known of one request while following it, and the next read to make."""

    def __init__(self, until_result: bool = False) -> None:
        self.until_result = until_result
        self.after = "0"
        """The id of the last event read (the stream's start before any)."""
        self.ended = False
        self.meta: dict[str, Any] | None = None
        """Celery's record of the task once it is over."""
        self.text = ""
        """The text of the current run (a run restarts from scratch after a lost worker or a split)."""
        self.worker: str | None = None
        self.batch_size: int | None = None
        self.step = Step.READ_STATE if until_result else Step.READ_EVENTS

    @property
    def started(self) -> bool:
        """Whether any event arrived (else the request is still queued)."""
        return self.after != "0"

    def on_events(self, events: Events) -> list[dict[str, Any]]:
        """Take one read of the stream; returns its events up to the end."""
        handed = []
        for event_id, event in events:
            if self.ended:
                break
            self.after = event_id
            self._apply(event)
            handed.append(event)
        if self.until_result:
            self.step = Step.READ_STATE
        else:
            self.step = Step.DONE if self.ended else Step.READ_EVENTS if events else Step.READ_STATE
        return handed

    def on_state(self, meta: dict[str, Any]) -> None:
        """Take one look at the task's state in Celery."""
        if meta.get("status") in READY_STATES:
            self.meta, self.step = meta, Step.DONE
        else:
            self.step = Step.PAUSE if self.until_result and self.ended else Step.READ_EVENTS

    def on_pause(self) -> None:
        self.step = Step.READ_STATE

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "start":
            self.worker, self.batch_size, self.text = event.get("worker"), event.get("batch_size"), ""
        elif kind == "delta":
            self.text += str(event.get("text", ""))
        elif kind == "end":
            self.ended = True


def follow(connection: FarmConnection, request_id: str, follower: Follower, *, timeout: float | None = None,
           block_ms: int = 1000, outage: Outage | None = None) -> Iterator[list[dict[str, Any]]]:
    """Drive ``follower`` with blocking reads until it is done. Yields the events of each read of
    the stream that brought some, and ``[]`` after each look at a task still running (a tick for
    a display). Raises ``TimeoutError`` after ``timeout`` seconds; with ``outage``, a Redis outage
    shorter than its grace is waited out (and said), and one that outlasts it or ``timeout``
    raises ``FarmUnavailable``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while follower.step is not Step.DONE:
        try:
            yield from _one_step(connection, request_id, follower, deadline, block_ms)
        except FarmUnavailable as error:
            if outage is None:
                raise
            outage.wait_or_raise(error, deadline)
            continue
        if outage is not None:
            outage.clear()
        if follower.step is not Step.DONE and deadline is not None and deadline <= time.monotonic():
            raise TimeoutError(f"request {request_id} not finished after {timeout}s")


def _one_step(connection: FarmConnection, request_id: str, follower: Follower, deadline: float | None,
              block_ms: int) -> Iterator[list[dict[str, Any]]]:
    step = follower.step
    if step is Step.READ_EVENTS:
        wait = block_ms if deadline is None else max(1, min(block_ms, int((deadline - time.monotonic()) * 1000)))
        events = follower.on_events(connection.read_events(request_id, follower.after, block_ms=wait))
        if events:
            yield events
    elif step is Step.READ_STATE:
        follower.on_state(connection.task_meta(request_id))
        if follower.step is not Step.DONE:
            yield []
    elif step is Step.PAUSE:
        time.sleep(PAUSE_SECONDS)
        follower.on_pause()
