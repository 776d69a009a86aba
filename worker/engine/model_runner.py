"""The model runner (``runner.Runner`` on torch): one batched, left-padded ``generate`` with
per-row sampling, stop rules, streaming and cancellation.

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
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria
from transformers import StoppingCriteriaList

from protocol.schema import GenerationRequest
from protocol.settings import BASE_ADAPTER
from worker.engine.runner import BatchRow, StepObserver, advance_rows, end_at_length, raise_injected_faults
from worker.engine.sampling import RowSampler, new_generator
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
        return BatchRow(request_id, input_ids, request, state, adapter, new_generator(request))

    def run(self, rows: list[BatchRow], observer: StepObserver) -> None:
        """Generate for ``rows`` until each is done; row states hold the outcome."""
        self.check_faults(rows)
        input_ids, mask = self.left_pad([row.input_ids for row in rows])
        stepper = _Stepper(rows, self.decode, observer)
        # eos_token_id=[], not None: generate fills None in from the model's config and would stop a
        # row at EOS that ignores it; the rows' own stop rules (RowState) end them.
        config = GenerationConfig(
            max_new_tokens=max(row.request.max_new_tokens for row in rows), do_sample=False,
            pad_token_id=self.pad_id, eos_token_id=[], bos_token_id=None)
        with torch.inference_mode(), self.adapters(rows) as adapter_kwargs:
            self.loaded.model.generate(
                input_ids=input_ids, attention_mask=mask, generation_config=config,
                logits_processor=LogitsProcessorList([RowSampler(rows)]),
                stopping_criteria=StoppingCriteriaList([stepper]), **adapter_kwargs)
        end_at_length(rows, observer, time.monotonic())

    def left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        # input_ids, mask: [B, S]; pad on the left so every row's next token is at column S.
        width = max(len(seq) for seq in sequences)
        ids = [[self.pad_id] * (width - len(seq)) + seq for seq in sequences]
        mask = [[0] * (width - len(seq)) + [1] * len(seq) for seq in sequences]
        device = self.loaded.device
        return torch.tensor(ids, device=device), torch.tensor(mask, device=device)

    def check_faults(self, rows: list[BatchRow]) -> None:
        """Raise the test-only injected faults when ``FARM_INJECT_FAULTS`` is on."""
        if self.inject_faults:
            raise_injected_faults(rows)

    def is_out_of_memory(self, error: BaseException) -> bool:
        return is_out_of_memory(error)

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
        advance_rows(self.rows, input_ids[:, -1].tolist(), self.decode, self.observer, time.monotonic())
        done = [row.state.done for row in self.rows]
        return torch.tensor(done, device=input_ids.device)  # type: ignore[return-value]


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OOM error, a host ``MemoryError``, or an allocator message saying so."""
    if isinstance(error, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
