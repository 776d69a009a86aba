"""Fakes at the engine's seams (runner, running batch, sinks), for pure tests of the engine core.

No torch and no Redis: the fake model's next token depends only on the row's own prompt and
position, as a greedy model's does, so every batch composition must give every row the same text.
The faults are the real runners' (``<<poison>>``, ``<<oom>>``), plus ``fail_next`` for a failure
in the middle of a run.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from protocol.schema import GenerationRequest, GenerationResult
from worker.engine.core import EngineCore, Submission
from worker.engine.runner import BatchRow, StepObserver, advance_rows, raise_injected_faults
from worker.engine.scheduler import ContinuousScheduler, DynamicScheduler
from worker.engine.sinks import EngineSinks
from worker.engine.strategies import ContinuousStrategy, DynamicStrategy, Strategy
from worker.rows import RowState

STRATEGIES = ["dynamic", "continuous"]
EOS = 0


def decode(ids: Any) -> str:
    return "".join(f" t{i}" for i in ids)


def next_token(row: BatchRow) -> int:
    """A pure function of the row's prompt and position (never EOS)."""
    return (sum(row.input_ids) * 31 + 7 * len(row.state.tokens)) % 97 + 1


def expected_text(prompt: str, new_tokens: int) -> str:
    """The text a row of ``prompt`` gets, alone or in any batch."""
    runner = FakeRunner()
    row = runner.new_row("x", runner.encode(prompt), GenerationRequest(prompt=prompt, max_new_tokens=new_tokens))
    while not row.state.done:
        row.state.push(next_token(row), decode, 0.0)
    return row.state.emitted


class FakeRunner:
    """``Runner``: runs rows to the end, one fake token per step; records every batch it ran."""

    def __init__(self, mixes_adapters: bool = True) -> None:
        self.mixes_adapters = mixes_adapters
        self.runs: list[list[str]] = []
        self.fail_next: tuple[int, Exception] | None = None
        """(after this many steps, raise this) in the next ``run`` or ``FakeBatch.step``."""

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()] or [1]

    def decode(self, ids: Any) -> str:
        return decode(ids)

    def new_row(self, request_id: str, input_ids: list[int], request: GenerationRequest) -> BatchRow:
        state = RowState(request.max_new_tokens, frozenset({EOS}), request.stop, request.ignore_eos)
        return BatchRow(request_id, input_ids, request, state, request.adapter or "base")

    def run(self, rows: list[BatchRow], observer: StepObserver) -> None:
        self.runs.append([row.request_id for row in rows])
        raise_injected_faults(rows)
        while not all(row.state.done for row in rows):
            self.step(rows, observer)

    def step(self, rows: list[BatchRow], observer: StepObserver) -> None:
        if self.fail_next is not None:
            steps, error = self.fail_next
            if steps == 0:
                self.fail_next = None
                raise error
            self.fail_next = (steps - 1, error)
        advance_rows(rows, [next_token(row) for row in rows], self.decode, observer, time.monotonic())

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, MemoryError)


class FakeBatch:
    """``RunningBatch`` on the fake runner: prefill gives each joiner its first token."""

    def __init__(self, runner: FakeRunner, prefill_steps: int = 0) -> None:
        self.runner = runner
        self.running: list[BatchRow] = []
        self.joins: list[list[str]] = []
        self.prefill_steps = prefill_steps
        """Joiners arriving while rows run take this many more steps to prefill (chunked prefill)."""
        self.filling: list[BatchRow] = []
        self._chunks_left = 0
        self.stepped_while_filling = 0
        """Decode steps the running rows took while joiners were being prefilled."""

    @property
    def rows(self) -> list[BatchRow]:
        return self.running + self.filling

    @property
    def joining(self) -> bool:
        return bool(self.filling)

    def join(self, rows: list[BatchRow], observer: StepObserver) -> None:
        assert not self.filling, "joined during a chunked prefill"
        self.joins.append([row.request_id for row in rows])
        raise_injected_faults(rows)
        if self.running and self.prefill_steps:
            self.filling, self._chunks_left = rows, self.prefill_steps
            return
        self._joined(rows, observer)

    def _joined(self, rows: list[BatchRow], observer: StepObserver) -> None:
        self.runner.step(rows, observer)
        self.running = self.running + rows

    def step(self, observer: StepObserver) -> None:
        raise_injected_faults(self.rows)
        self.runner.step(self.running, observer)
        if self.filling:
            self.stepped_while_filling += bool(self.running)
            self._chunks_left -= 1
            if self._chunks_left <= 0 or not self.running:
                rows, self.filling = self.filling, []
                self._joined(rows, observer)

    def evict(self) -> list[BatchRow]:
        done = [row for row in self.running if row.state.done]
        self.running = [row for row in self.running if not row.state.done]
        return done

    def drop(self) -> list[BatchRow]:
        rows, self.running, self.filling = self.rows, [], []
        return rows


@dataclass
class FakeOutput:
    """``StreamOutput`` that keeps every event."""

    begins: list[tuple[list[str], int]] = field(default_factory=list)
    streamed: dict[str, str] = field(default_factory=dict)
    deltas: Counter[str] = field(default_factory=Counter)
    results: dict[str, GenerationResult] = field(default_factory=dict)

    def begin(self, request_ids: list[str], worker: str, batch_size: int) -> None:
        self.begins.append((request_ids, batch_size))

    def write(self, deltas: dict[str, str], finished: list[str]) -> None:
        for request_id, text in deltas.items():
            self.streamed[request_id] = self.streamed.get(request_id, "") + text
            self.deltas[request_id] += bool(text)

    def end(self, result: GenerationResult) -> None:
        assert result.id not in self.results, f"{result.id} ended twice"
        self.results[result.id] = result


@dataclass
class FakeCancels:
    """``CancelFlags``: ``flags`` are cancelled; ``after_deltas`` cancel a row once it streamed that much."""

    output: FakeOutput
    flags: set[str] = field(default_factory=set)
    after_deltas: dict[str, int] = field(default_factory=dict)

    def cancelled(self, request_ids: list[str]) -> set[str]:
        due = {r for r, n in self.after_deltas.items() if self.output.deltas[r] >= n}
        return (self.flags | due) & set(request_ids)


@dataclass
class FakeCounter:
    executions: Counter[str] = field(default_factory=Counter)

    def count_execution(self, request_ids: list[str]) -> None:
        self.executions.update(request_ids)

    def note_redelivery(self, request_id: str) -> None:
        pass


@dataclass
class Rig:
    """An engine core on fakes, driven step by step from the test."""

    core: EngineCore
    runner: FakeRunner
    output: FakeOutput
    cancels: FakeCancels
    counter: FakeCounter
    futures: dict[str, Future[GenerationResult]] = field(default_factory=dict)

    def submit(self, request_id: str, prompt: str, new_tokens: int = 8, **params: Any) -> None:
        priority = params.pop("priority", 0)
        request = GenerationRequest(prompt=prompt, max_new_tokens=new_tokens, **params)
        sub = Submission(request_id, request, time.time(), priority)
        self.futures[request_id] = sub.future
        self.core.admit([sub])

    def run(self, max_steps: int = 10_000) -> dict[str, GenerationResult]:
        """Step until every submitted request has its result."""
        for _ in range(max_steps):
            if all(f.done() for f in self.futures.values()):
                return {rid: f.result() for rid, f in self.futures.items()}
            self.core.step()
        raise AssertionError("requests still unfinished")


def make_strategy(name: str, runner: FakeRunner, prefill_steps: int = 0, **scheduler: Any) -> Strategy:
    settings = {"max_batch_size": 16, "max_batch_tokens": 8192, "max_wait_s": 0.0, **scheduler}
    if name == "continuous":
        return ContinuousStrategy(ContinuousScheduler(**settings), FakeBatch(runner, prefill_steps))
    return DynamicStrategy(DynamicScheduler(**settings), runner)


def make_rig(strategy: str, max_prompt_tokens: int = 64, mixes_adapters: bool = True, **scheduler: Any) -> Rig:
    runner = FakeRunner(mixes_adapters)
    output = FakeOutput()
    cancels, counter = FakeCancels(output), FakeCounter()
    sinks = EngineSinks(output, cancels, counter, cancel_poll_seconds=0.0)
    core = EngineCore(runner, make_strategy(strategy, runner, **scheduler), sinks, "fake@test",
                      lambda r: r.prompt or "", max_prompt_tokens)
    return Rig(core, runner, output, cancels, counter)
