"""The engine in-process with the real tiny model and a real Redis: out-of-memory splitting and the
lowered token budget, deterministic because all requests are queued before the engine starts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from protocol.redis_conn import connect
from protocol.schema import GenerationRequest, Limits
from protocol.settings import FarmSettings
from tests.conftest import RedisServer
from tests.helpers import PROMPTS
from worker.engine.build import make_engine
from worker.engine.model_runner import is_out_of_memory
from worker.model import load_model, render_prompt
from worker.streams import redis_sinks

pytestmark = pytest.mark.integration


def test_cuda_and_host_out_of_memory_are_recognised() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_out_of_memory_batch_is_split_and_no_request_fails(redis_server: RedisServer, tiny_model: Path) -> None:
    settings = FarmSettings(model=str(tiny_model), inject_faults=1, max_batch_size=8, max_wait_ms=0)
    loaded = load_model(settings)
    sinks = redis_sinks(connect(redis_server.url("engine")), settings)
    engine = make_engine(settings, loaded, sinks, "engine@test",
                         lambda r: render_prompt(loaded, "none", r.prompt, r.messages))
    prompts = [f"{p} <<oom>>" if i == 5 else p for i, p in enumerate(PROMPTS)]
    requests = [GenerationRequest.from_dict({"prompt": p, "max_new_tokens": 6}, Limits()) for p in prompts]
    futures = [engine.submit(f"oom-{i}", r, time.time()) for i, r in enumerate(requests)]
    engine.start()  # all eight are waiting: the first batch holds them all and runs out of memory
    try:
        results = [f.result(timeout=120) for f in futures]
    finally:
        engine.stop()
    assert all(r.ok and r.completion_tokens == 6 for r in results), [r.error for r in results]
    assert results[5].batch_size == 1  # split until the culprit ran alone
    assert max(r.batch_size for r in results) >= 2  # its neighbours still ran batched
    assert engine.stats.oom_splits >= 1
    assert engine.scheduler.token_budget(time.monotonic()) < settings.max_batch_tokens
