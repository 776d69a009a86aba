"""The model runner: one batched, left-padded ``generate`` with per-row sampling, stop rules,
streaming and cancellation.

Rows of different LoRA adapters share a batch through peft's ``adapter_names`` (each row picks
its adapter in every LoRA layer); a batch of one adapter uses the plain adapter switch.

Per-row parameters in one ``generate``: the batch always decodes greedily, and a logits processor
samples each sampling row itself (its own temperature, top-p, top-k and seeded generator) and
leaves only the chosen token finite. Greedy rows are then exactly plain greedy ``generate``.
A stopping criterion ends each row on its own (eos, stop strings, its ``max_new_tokens``, a
cancel) and streams its new text.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers import StoppingCriteriaList

from protocol.schema import GenerationRequest
from protocol.settings import BASE_ADAPTER
from worker.model import LoadedModel
from worker.rows import RowState

PEFT_BASE = "__base__"
"""peft's name for "no adapter" in ``adapter_names``."""


def configure_torch_threads(requested: int, device: str) -> int:
    """Set torch's intra-op threads for a worker; ``0`` picks half the usable cores.

    On a 2-core CPU, two OpenMP threads competing with Redis, Celery and clients spin at every
    barrier: a 16-token request on the tiny model took ~0.4-1 s instead of ~20 ms with one thread.
    """
    if requested <= 0 and device != "cpu":
        return torch.get_num_threads()
    threads = requested if requested > 0 else max(1, len(os.sched_getaffinity(0)) // 2)
    torch.set_num_threads(threads)
    return threads


class StepObserver(Protocol):
    """Told each step's text deltas (and which rows finished); answers which rows to cancel."""

    def on_step(self, deltas: dict[str, str], finished: list[str]) -> set[str]: ...


@dataclass
class BatchRow:
    """A request inside the running batch."""

    request_id: str
    input_ids: list[int]
    request: GenerationRequest
    state: RowState
    adapter: str
    generator: torch.Generator | None = None


class ModelRunner:
    """Runs batches on one loaded model. Only the engine's model thread calls it."""

    def __init__(self, loaded: LoadedModel, inject_faults: bool = False) -> None:
        self.loaded = loaded
        self.pad_id = int(loaded.tokenizer.pad_token_id)
        self.inject_faults = inject_faults

    def encode(self, text: str) -> list[int]:
        return list(self.loaded.tokenizer(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.loaded.tokenizer.decode(ids, skip_special_tokens=True,
                                                clean_up_tokenization_spaces=False))

    def new_row(self, request_id: str, input_ids: list[int], request: GenerationRequest) -> BatchRow:
        state = RowState(request.max_new_tokens, self.loaded.eos_ids, request.stop, request.ignore_eos)
        adapter = request.adapter or self.loaded.default_adapter
        return BatchRow(request_id, input_ids, request, state, adapter, _generator(request))

    def run(self, rows: list[BatchRow], observer: StepObserver) -> None:
        """Generate for ``rows`` until each is done; row states hold the outcome."""
        if self.inject_faults:
            _injected_faults(rows)
        input_ids, mask = self.left_pad([row.input_ids for row in rows])
        stepper = _Stepper(rows, self.decode, observer)
        config = GenerationConfig(
            max_new_tokens=max(row.request.max_new_tokens for row in rows), do_sample=False,
            pad_token_id=self.pad_id, eos_token_id=None, bos_token_id=None)
        with torch.inference_mode(), self.adapters(rows) as adapter_kwargs:
            self.loaded.model.generate(
                input_ids=input_ids, attention_mask=mask, generation_config=config,
                logits_processor=LogitsProcessorList([_RowSampler(rows)]),
                stopping_criteria=StoppingCriteriaList([stepper]), **adapter_kwargs)
        stepper.finish_all(time.monotonic())

    def left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        # input_ids, mask: [B, S]; pad on the left so every row's next token is at column S.
        width = max(len(seq) for seq in sequences)
        ids = [[self.pad_id] * (width - len(seq)) + seq for seq in sequences]
        mask = [[0] * (width - len(seq)) + [1] * len(seq) for seq in sequences]
        device = self.loaded.device
        return torch.tensor(ids, device=device), torch.tensor(mask, device=device)

    @property
    def mixes_adapters(self) -> bool:
        """Whether rows of different adapters may share a batch (LoRA through peft: yes)."""
        return bool(self.loaded.adapters)

    @contextlib.contextmanager
    def adapters(self, rows: list[BatchRow]) -> Iterator[dict[str, Any]]:
        """Select the rows' adapters; yields extra kwargs for ``generate`` or ``forward``."""
        model = self.loaded.model
        names = {row.adapter for row in rows}
        if not self.loaded.adapters:
            yield {}
        elif len(names) > 1:
            # One batch, several adapters: peft routes each row through its own LoRA weights.
            yield {"adapter_names": [PEFT_BASE if r.adapter == BASE_ADAPTER else r.adapter for r in rows]}
        elif BASE_ADAPTER in names:
            with model.disable_adapter():
                yield {}
        else:
            model.set_adapter(names.pop())
            yield {}


class _Stepper(StoppingCriteria):
    """Called by ``generate`` after each new token: advances rows, streams, applies cancels."""

    def __init__(self, rows: list[BatchRow], decode: Callable[[Sequence[int]], str],
                 observer: StepObserver) -> None:
        self.rows, self.decode, self.observer = rows, decode, observer

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        now = time.monotonic()
        last = input_ids[:, -1].tolist()  # [B]
        deltas: dict[str, str] = {}
        finished: list[str] = []
        for row, token in zip(self.rows, last, strict=True):
            if row.state.done:
                continue
            deltas[row.request_id] = row.state.push(token, self.decode, now)
            if row.state.done:
                finished.append(row.request_id)
        self._cancel(self.observer.on_step(deltas, finished), now)
        done = [row.state.done for row in self.rows]
        return torch.tensor(done, device=input_ids.device)  # type: ignore[return-value]

    def _cancel(self, cancelled: set[str], now: float) -> None:
        deltas: dict[str, str] = {}
        for row in self.rows:
            if row.request_id in cancelled and not row.state.done:
                deltas[row.request_id] = row.state.cancel(self.decode, now)
        if deltas:
            self.observer.on_step(deltas, list(deltas))

    def finish_all(self, now: float) -> None:
        """Rows ``generate`` stopped without us (its own length limit) end as ``length``."""
        deltas: dict[str, str] = {}
        for row in self.rows:
            if not row.state.done:
                row.state.finish_reason = "length"
                row.state.finished_at = now
                deltas[row.request_id] = ""
        if deltas:
            self.observer.on_step(deltas, list(deltas))


class _RowSampler(LogitsProcessor):
    """Samples each non-greedy row with its own parameters; greedy rows pass untouched."""

    def __init__(self, rows: list[BatchRow]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, row in enumerate(self.rows):
            if not row.request.greedy and not row.state.done:
                scores[i] = sample_to_onehot(scores[i], row.request, row.generator)
        return scores


def sample_to_onehot(logits: torch.Tensor, request: GenerationRequest,
                     generator: torch.Generator | None) -> torch.Tensor:
    """Draw a token from ``logits`` [V] per the request; return logits where only it is finite."""
    # The generators live on the CPU, so sampling does too (one row of V floats).
    probs = torch.softmax(_filter(logits.float().cpu() / request.temperature, request), dim=-1)
    token = torch.multinomial(probs, 1, generator=generator).to(logits.device)
    out = torch.full_like(logits, float("-inf"))
    out[token] = 0.0
    return out


def _filter(logits: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
    if request.top_k and request.top_k < logits.numel():
        kth = torch.topk(logits, request.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if request.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= request.top_p  # keep the first
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _generator(request: GenerationRequest) -> torch.Generator | None:
    if request.greedy:
        return None
    generator = torch.Generator()
    if request.seed is not None:
        generator.manual_seed(request.seed)
    else:
        generator.seed()
    return generator


POISON_MARK = "<<poison>>"
OOM_MARK = "<<oom>>"


def _injected_faults(rows: list[BatchRow]) -> None:
    """Test-only faults (``FARM_INJECT_FAULTS=1``): a poisoned prompt fails whatever batch it is
    in; an ``<<oom>>`` prompt makes any batch of more than one row run out of memory."""
    prompts = [row.request.prompt or "" for row in rows]
    if any(POISON_MARK in p for p in prompts):
        raise RuntimeError("injected fault: poisoned prompt")
    if len(rows) > 1 and any(OOM_MARK in p for p in prompts):
        raise MemoryError("injected fault: out of memory")
