"""The batching policy as a pure planner: plain dataclasses in and out, no torch, no clock.

The engine's strategies (strategies.py) ask ``next_batch(now)`` or ``joiners(running, now)``
what to start and report out-of-memory events back; the scheduler decides who runs together.
Tested without a model (tests/test_scheduler.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Pending:
    """A request waiting for a batch, as the scheduler sees it."""

    request_id: str
    prompt_tokens: int
    max_new_tokens: int
    arrived: float
    priority: int = 0
    """Lower runs first (0 interactive, 1 bulk)."""
    group: str = ""
    """Requests of different groups never share a batch (e.g. different adapters)."""

    @property
    def order(self) -> tuple[int, float]:
        return (self.priority, self.arrived)


@dataclass
class DynamicScheduler:
    """Dynamic batching: group waiting requests, run the group to completion.

    A batch starts when it is full, or when its oldest request has waited ``max_wait_s``. Its
    cost is rows × (longest prompt + most new tokens), since left padding makes every row as long
    as the longest; it must stay within the token budget (one request alone always may run).
    """

    max_batch_size: int = 16
    max_batch_tokens: int = 8192
    max_wait_s: float = 0.01
    oom_backoff_s: float = 30.0
    """After an out-of-memory error, the budget stays lowered this long."""
    waiting: list[Pending] = field(default_factory=list)
    _budget_scale: float = 1.0
    _lowered_until: float = 0.0

    def add(self, item: Pending) -> None:
        self.waiting.append(item)

    def token_budget(self, now: float) -> int:
        """The current budget: lowered after an out-of-memory error, restored later."""
        if now >= self._lowered_until:
            self._budget_scale = 1.0
        return max(1, int(self.max_batch_tokens * self._budget_scale))

    def on_out_of_memory(self, now: float, failed_cost: int) -> None:
        """Lower the budget below the batch that did not fit, for ``oom_backoff_s``."""
        current = self.token_budget(now)
        target = min(current, failed_cost) // 2
        self._budget_scale = max(target, 1) / self.max_batch_tokens
        self._lowered_until = now + self.oom_backoff_s

    def wait_time(self, now: float) -> float | None:
        """Seconds until the oldest waiting request is due; ``None`` when nothing waits."""
        if not self.waiting:
            return None
        if len(self.waiting) >= self.max_batch_size:
            return 0.0
        oldest = min(item.arrived for item in self.waiting)
        return max(0.0, oldest + self.max_wait_s - now)

    def next_batch(self, now: float) -> list[Pending]:
        """The next batch to run now, or an empty list when it is better to wait."""
        due = self.wait_time(now)
        if due is None or due > 0:
            return []
        batch = self._fill(sorted(self.waiting, key=lambda p: p.order), self.token_budget(now))
        chosen = {item.request_id for item in batch}
        self.waiting = [item for item in self.waiting if item.request_id not in chosen]
        return batch

    def _fill(self, ordered: list[Pending], budget: int) -> list[Pending]:
        head = ordered[0]
        batch = [head]
        for item in ordered[1:]:
            if len(batch) >= self.max_batch_size:
                break
            if item.group == head.group and batch_cost([*batch, item]) <= budget:
                batch.append(item)
        return batch


def batch_cost(items: list[Pending]) -> int:
    """Tokens a left-padded batch holds at its end: rows × (longest prompt + most new tokens)."""
    if not items:
        return 0
    longest = max(item.prompt_tokens for item in items)
    most_new = max(item.max_new_tokens for item in items)
    return len(items) * (longest + most_new)


def split_for_retry(items: list[T]) -> list[list[T]]:
    """Halves of a batch that failed for memory; a single request cannot be split further."""
    if len(items) <= 1:
        return [items]
    middle = len(items) // 2
    return [items[:middle], items[middle:]]


@dataclass
class ContinuousScheduler(DynamicScheduler):
    """Continuous batching: waiting requests join the running batch at any decode step.

    Waiting requests are taken at once, up to ``max_batch_size`` rows and the token budget
    (counted as if all rows were as long as the longest), an idle engine's too: ``max_wait_s`` is
    the dynamic strategy's. A request arriving a moment after a lone one joins it at the next
    decode step, so waiting for batch-mates would only delay the lone user (by the whole wait, at
    every request of a single client).
    """

    def wait_time(self, now: float) -> float | None:
        """Waiting requests are due at once; ``None`` when nothing waits."""
        return 0.0 if self.waiting else None

    def joiners(self, running: list[Pending], now: float) -> list[Pending]:
        """Waiting requests to add to the running batch now (may be empty)."""
        room = self.max_batch_size - len(running)
        if room <= 0 or not self.waiting:
            return []
        chosen = self._fill_around(running, sorted(self.waiting, key=lambda p: p.order), room,
                                   self.token_budget(now))
        taken = {item.request_id for item in chosen}
        self.waiting = [item for item in self.waiting if item.request_id not in taken]
        return chosen

    def _fill_around(self, running: list[Pending], ordered: list[Pending], room: int,
                     budget: int) -> list[Pending]:
        chosen: list[Pending] = []
        group = running[0].group if running else ordered[0].group
        for item in ordered:
            if len(chosen) >= room:
                break
            fits = batch_cost([*running, *chosen, item]) <= budget or not (running or chosen)
            if item.group == group and fits:
                chosen.append(item)
        return chosen
