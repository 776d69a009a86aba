"""``make_engine``: the engine for ``FARM_STRATEGY`` on a loaded model (the torch side is built here)."""

from __future__ import annotations

import logging
from typing import Any

from protocol.settings import FarmSettings
from worker.engine.core import EngineCore, RenderFn
from worker.engine.kv_slab import ContinuousBatch
from worker.engine.model_runner import ModelRunner, configure_torch_threads
from worker.engine.model_thread import Engine
from worker.engine.prefix_cache import PrefixCache, prefix_cache_off_reason
from worker.engine.scheduler import ContinuousScheduler, DynamicScheduler
from worker.engine.sinks import EngineSinks
from worker.engine.strategies import ContinuousStrategy, DynamicStrategy, Strategy

log = logging.getLogger(__name__)


def make_engine(settings: FarmSettings, loaded: Any, sinks: EngineSinks, worker_name: str, render: RenderFn,
                device: str = "cpu") -> Engine:
    """The engine for ``FARM_STRATEGY`` (dynamic or continuous), torch threads set for the device."""
    threads = configure_torch_threads(settings.torch_threads, device)
    log.info("torch intra-op threads: %d; batching strategy: %s", threads, settings.strategy)
    runner = ModelRunner(loaded, inject_faults=bool(settings.inject_faults))
    args = (settings.max_batch_size, settings.max_batch_tokens, settings.max_wait_ms / 1000)
    strategy: Strategy
    if settings.strategy == "continuous":
        batch = ContinuousBatch(runner, _prefix_cache(settings, loaded), settings.prefill_chunk_tokens,
                                bool(settings.packed_prefill))
        strategy = ContinuousStrategy(ContinuousScheduler(*args), batch)
    else:
        strategy = DynamicStrategy(DynamicScheduler(*args), runner)
    return Engine(EngineCore(runner, strategy, sinks, worker_name, render, settings.max_prompt_tokens))


def _prefix_cache(settings: FarmSettings, loaded: Any) -> PrefixCache | None:
    off = prefix_cache_off_reason(loaded.quant, settings.prefix_cache_mb)
    if off is not None:
        log.info("prefix cache off: %s", off)
        return None
    log.info("prefix cache: %d MB", settings.prefix_cache_mb)
    return PrefixCache(settings.prefix_cache_mb * 2**20)
