"""The worker's warm-up (``FARM_WARMUP``): before it takes work, the model thread runs one burst
of the batch's largest size and drops it, so that the first real burst finds its memory and
kernels ready.

A worker's first burst is its slowest: every tensor of it is memory the process never touched
(the kernel faults in and zeroes each page), and oneDNN compiles a kernel per new input shape. The
first join of 64 prompts of the 134M llama32k model took 5.9-6.5 s in a fresh worker against
2.6-3.1 s once warm (262,000 page faults, 1 GB), a quarter of a 64-client bench run. The memory
stays in the heap for the bursts after it (``worker/heap.py``), and the warm-up runs on the model
thread because glibc keeps freed memory in the arena of the thread that freed it. Its rows are
the engine's own code path with a throwaway batch: no prefix cache, no stream, no result.
"""

from __future__ import annotations

import logging
import time

from protocol.schema import GenerationRequest
from protocol.settings import FarmSettings
from worker.engine.kv_slab import ContinuousBatch
from worker.engine.model_runner import ModelRunner
from worker.engine.runner import Quiet

log = logging.getLogger(__name__)

PROMPT_TOKENS = 32
"""Prompt length of each warm-up row: a short chat turn (longer prompts fault in the rest: the first
join of 64 bench prompts of up to ~75 tokens after it took 18,000-137,000 faults, against 208,000-
262,000 cold; 64 tokens cut that to 5,000-41,000 but took 9.1 s against 3.2-3.9 s for llama32k)."""

STEPS = 2
"""Decode steps after the join (the running batch's buffers and the decode kernels)."""

TEXT = "The quick brown fox jumps over the lazy dog. "


def warm_up_shape(settings: FarmSettings) -> tuple[int, int]:
    """(rows, prompt tokens) of the warm-up: the most rows of ``PROMPT_TOKENS`` that the batch
    size and token budget allow."""
    tokens = min(PROMPT_TOKENS, settings.max_prompt_tokens)
    rows = min(settings.max_batch_size, max(1, settings.max_batch_tokens // (tokens + STEPS + 1)))
    return rows, tokens


def warm_up(runner: ModelRunner, settings: FarmSettings) -> int:
    """Run the warm-up burst for ``settings.strategy``; returns its rows (0: it failed, out of
    memory on a small device, say, which is logged and leaves the worker as it was)."""
    rows, tokens = warm_up_shape(settings)
    started = time.monotonic()
    try:
        text = runner.encode(TEXT) or [0]
        ids = (text * (tokens // len(text) + 1))[:tokens]
        request = GenerationRequest(prompt=TEXT, max_new_tokens=STEPS + 1, ignore_eos=True)
        burst = [runner.new_row(f"warm-up-{i}", ids, request) for i in range(rows)]
        if settings.strategy == "continuous":
            batch = ContinuousBatch(runner, None, 0, bool(settings.packed_prefill))
            batch.join(burst, Quiet())
            for _ in range(STEPS):
                batch.step(Quiet())
            batch.drop()
        else:
            runner.run(burst, Quiet())
    except Exception as error:  # noqa: BLE001 - a warm-up must never stop the worker
        log.warning("warm-up of %d rows x %d tokens failed (%s); serving cold", rows, tokens, error)
        return 0
    log.info("warmed up: %d rows x %d tokens in %.1fs", rows, tokens, time.monotonic() - started)
    return rows
