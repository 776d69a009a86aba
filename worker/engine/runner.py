"""What the engine asks of a model runner, as Protocols, and the row bookkeeping every runner shares.

The engine core never sees torch: it hands ``BatchRow`` lists to a ``Runner`` (run them to the
end) or a ``RunningBatch`` (rows join, step one token at a time, leave), and reads the outcome
from each row's ``RowState``. The real runners are ``model_runner.ModelRunner`` and
``kv_slab.ContinuousBatch``; tests drive the core with fakes (tests/engine_fakes.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from protocol.schema import GenerationRequest
from worker.rows import RowState

if TYPE_CHECKING:
    import torch

Decode = Callable[[Sequence[int]], str]

POISON_MARK = "<<poison>>"
OOM_MARK = "<<oom>>"


class StepObserver(Protocol):
    """Told each step's text deltas (and which rows finished); answers which rows to cancel."""

    def on_step(self, deltas: dict[str, str], finished: list[str]) -> set[str]: ...


class Quiet:
    """A ``StepObserver`` that streams nowhere and cancels nothing (warm-up, benches, tests)."""

    def on_step(self, deltas: dict[str, str], finished: list[str]) -> set[str]:
        return set()


@dataclass
class BatchRow:
    """A request inside the running batch."""

    request_id: str
    input_ids: list[int]
    request: GenerationRequest
    state: RowState
    adapter: str
    generator: torch.Generator | None = None


class Runner(Protocol):
    """Runs rows on one loaded model. Only the engine's model thread calls it."""

    @property
    def mixes_adapters(self) -> bool:
        """Whether rows of different adapters may share a batch."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def new_row(self, request_id: str, input_ids: list[int], request: GenerationRequest) -> BatchRow: ...

    def run(self, rows: list[BatchRow], observer: StepObserver) -> None:
        """Generate for ``rows`` until each is done; row states hold the outcome."""
        ...

    def is_out_of_memory(self, error: BaseException) -> bool:
        """Whether ``error`` says the batch did not fit (then it is retried in halves)."""
        ...


class RunningBatch(Protocol):
    """A batch that rows join and leave between decode steps (continuous batching)."""

    @property
    def rows(self) -> list[BatchRow]: ...

    @property
    def joining(self) -> bool:
        """Whether joiners are still being prefilled over several steps (others wait for them)."""
        ...

    def join(self, rows: list[BatchRow], observer: StepObserver) -> None:
        """Prefill ``rows``, stream their first token, add them to the batch."""
        ...

    def step(self, observer: StepObserver) -> None:
        """One new token for every running row."""
        ...

    def evict(self) -> list[BatchRow]:
        """Cut finished rows out of the batch; returns them."""
        ...

    def drop(self) -> list[BatchRow]:
        """Empty the batch (after a failed step); returns the rows that were in it."""
        ...


def advance_rows(rows: list[BatchRow], tokens: list[int], decode: Decode, observer: StepObserver,
                 now: float) -> None:
    """Push each unfinished row's new token, stream the deltas, then apply the cancels the
    observer answers with."""
    deltas: dict[str, str] = {}
    finished: list[str] = []
    for row, token in zip(rows, tokens, strict=True):
        if row.state.done:
            continue
        deltas[row.request_id] = row.state.push(token, decode, now)
        if row.state.done:
            finished.append(row.request_id)
    cancelled = observer.on_step(deltas, finished)
    deltas = {row.request_id: row.state.cancel(decode, now)
              for row in rows if row.request_id in cancelled and not row.state.done}
    if deltas:
        observer.on_step(deltas, list(deltas))


def end_at_length(rows: list[BatchRow], observer: StepObserver, now: float) -> None:
    """Rows a runner stopped without their own rule (its length limit) end as ``length``."""
    deltas: dict[str, str] = {}
    for row in rows:
        if not row.state.done:
            row.state.finish_reason = "length"
            row.state.finished_at = now
            deltas[row.request_id] = ""
    if deltas:
        observer.on_step(deltas, list(deltas))


def raise_injected_faults(rows: list[BatchRow]) -> None:
    """Test-only faults (``FARM_INJECT_FAULTS=1``): a poisoned prompt fails whatever batch it is
    in; an ``<<oom>>`` prompt makes any batch of more than one row run out of memory."""
    prompts = [row.request.prompt or "" for row in rows]
    if any(POISON_MARK in p for p in prompts):
        raise RuntimeError("injected fault: poisoned prompt")
    if len(rows) > 1 and any(OOM_MARK in p for p in prompts):
        raise MemoryError("injected fault: out of memory")

