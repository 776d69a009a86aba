"""The batching strategies: the planning plug-ins of the engine core (``FARM_STRATEGY``).

A strategy answers two questions for the core: which waiting requests start now (``plan``), and
what running a step means for them (``start``, then ``advance`` while rows remain). Each step
returns a ``StepOutput``; the core does the rest of a request's life (admit, finish, recover).

- ``DynamicStrategy``: group waiting requests, run the group to completion in one ``generate``.
- ``ContinuousStrategy``: requests join the running batch at any decode step and leave when done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from worker.engine.runner import BatchRow, Runner, RunningBatch, StepObserver
from worker.engine.scheduler import ContinuousScheduler, DynamicScheduler, Pending


@dataclass(frozen=True)
class StepOutput:
    """What a step did: the rows that took part, the batch's size then, the rows that left it done."""

    stepped: list[BatchRow]
    size: int
    finished: list[BatchRow]


NOTHING = StepOutput([], 0, [])


class Strategy(Protocol):
    @property
    def scheduler(self) -> DynamicScheduler: ...

    @property
    def running(self) -> int:
        """Rows still in the batch between steps (then the core must not wait for new requests)."""
        ...

    def plan(self, now: float, running: list[Pending]) -> list[Pending]:
        """The waiting requests to start now; ``running`` are the requests in the batch."""
        ...

    def start(self, rows: list[BatchRow], observer: StepObserver) -> StepOutput: ...
    def advance(self, observer: StepObserver) -> StepOutput: ...

    def drop(self) -> list[BatchRow]:
        """After a failed ``advance``: take every row out of the batch; returns them."""
        ...


def run_to_end(runner: Runner, rows: list[BatchRow], observer: StepObserver) -> StepOutput:
    """One batch, generated until every row is done."""
    runner.run(rows, observer)
    return StepOutput(rows, len(rows), rows)


class DynamicStrategy:
    """Group waiting requests, run each group to completion (``FARM_STRATEGY=dynamic``)."""

    running = 0

    def __init__(self, scheduler: DynamicScheduler, runner: Runner) -> None:
        self._scheduler, self.runner = scheduler, runner

    @property
    def scheduler(self) -> DynamicScheduler:
        return self._scheduler

    def plan(self, now: float, running: list[Pending]) -> list[Pending]:
        return self._scheduler.next_batch(now)

    def start(self, rows: list[BatchRow], observer: StepObserver) -> StepOutput:
        return run_to_end(self.runner, rows, observer)

    def advance(self, observer: StepObserver) -> StepOutput:
        return NOTHING  # no row outlives its start

    def drop(self) -> list[BatchRow]:
        return []


class ContinuousStrategy:
    """Requests join the running batch at every decode step and leave when done
    (``FARM_STRATEGY=continuous``, the default)."""

    def __init__(self, scheduler: ContinuousScheduler, batch: RunningBatch) -> None:
        self._scheduler, self.batch = scheduler, batch

    @property
    def scheduler(self) -> ContinuousScheduler:
        return self._scheduler

    @property
    def running(self) -> int:
        return len(self.batch.rows)

    def plan(self, now: float, running: list[Pending]) -> list[Pending]:
        if self.batch.joining:  # a chunked prefill is under way: the next joiners wait for its end
            return []
        return self._scheduler.joiners(running, now)

    def start(self, rows: list[BatchRow], observer: StepObserver) -> StepOutput:
        self.batch.join(rows, observer)
        return self._output(rows)

    def advance(self, observer: StepObserver) -> StepOutput:
        self.batch.step(observer)
        return self._output(list(self.batch.rows))

    def drop(self) -> list[BatchRow]:
        return self.batch.drop()

    def _output(self, stepped: list[BatchRow]) -> StepOutput:
        return StepOutput(stepped, len(self.batch.rows), self.batch.evict())
