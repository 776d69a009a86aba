"""The delivery overhead of a farm mode and the API's own cost (pure: samples in, figures out).

A farm request's latency as its client saw it is the worker's time generating it
(``GenerationResult.generate_seconds``: batch start to last token) plus everything around it:
enqueueing, the queue, the stream's way back to the client and the stored result. That rest, the
**delivery overhead** (latency minus the worker's generate time; and time to first token minus the
worker's ``first_token_seconds``), does not depend on how fast the model runs, which on a shared
2-core host drifts by hundreds of milliseconds from one request to the next. At one client the
modes take turns request by request (``bench.run_model.take_turns``), so request ``i`` of
``farm-openai`` and request ``i`` of ``farm-continuous`` ran the same job one after the other; the
API's own cost is the median over those pairs of ``overhead(farm-openai) - overhead(farm-continuous)``.
"""

from __future__ import annotations

import statistics
from typing import Any

Sample = Any
"""A ``bench.workload.Sample`` (not imported: workload imports this module)."""

API_MODE = "farm-openai"
FARM_MODE = "farm-continuous"


def delivery(sample: Sample) -> float | None:
    """Client-observed latency minus the worker's generate time (seconds), when the farm's
    times are known."""
    if sample.error is not None or sample.farm_generate is None:
        return None
    return sample.latency - sample.farm_generate


def ttft_delivery(sample: Sample) -> float | None:
    """Client-observed time to first token minus the worker's (seconds)."""
    if sample.error is not None or sample.ttft is None or sample.farm_first_token is None:
        return None
    return sample.ttft - sample.farm_first_token


def _ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 2)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def overhead_stats(samples: list[Sample]) -> dict[str, float | None]:
    """A run's median delivery overheads and farm queue time (ms); empty when no sample has the
    farm's times (a mode that is not the farm)."""
    if not any(s.farm_generate is not None for s in samples):
        return {}
    latency = [d for s in samples if (d := delivery(s)) is not None]
    ttft = [d for s in samples if (d := ttft_delivery(s)) is not None]
    queue = [s.farm_queue for s in samples if s.error is None and s.farm_queue is not None]
    return {"overhead_ms_p50": _ms(_median(latency)), "ttft_overhead_ms_p50": _ms(_median(ttft)),
            "farm_queue_ms_p50": _ms(_median(queue))}


def pairs(ours: list[Sample], base: list[Sample]) -> list[tuple[Sample, Sample]]:
    """Request ``i`` of each run, when both ran the same job (``take_turns`` keeps job order)."""
    return [(a, b) for a, b in zip(ours, base, strict=False) if (a.index, a.kind) == (b.index, b.kind)]


def api_cost(ours: list[Sample], base: list[Sample]) -> dict[str, Any] | None:
    """The API's own cost: the median paired difference of delivery overheads (and of TTFT
    overheads), ``ours`` (``farm-openai``) minus ``base`` (``farm-continuous``), in ms; beside it
    the raw difference of the two runs' p50 latencies, which carries the model's drift. ``None``
    when no pair has the farm's times."""
    latency, ttft = [], []
    for a, b in pairs(ours, base):
        da, db = delivery(a), delivery(b)
        if da is not None and db is not None:
            latency.append(da - db)
        ta, tb = ttft_delivery(a), ttft_delivery(b)
        if ta is not None and tb is not None:
            ttft.append(ta - tb)
    if not latency:
        return None
    ok_ours = [s.latency for s in ours if s.error is None]
    ok_base = [s.latency for s in base if s.error is None]
    raw = statistics.median(ok_ours) - statistics.median(ok_base)
    return {"mode": API_MODE, "baseline": FARM_MODE, "pairs": len(latency), "latency_ms": _ms(_median(latency)),
            "ttft_ms": _ms(_median(ttft)), "latency_ms_mean": _ms(statistics.fmean(latency)),
            "raw_p50_diff_ms": _ms(raw), "overhead_ms_p50": {API_MODE: overhead_stats(ours)["overhead_ms_p50"],
                                                              FARM_MODE: overhead_stats(base)["overhead_ms_p50"]}}


def api_cost_of_runs(runs: list[Any]) -> dict[str, Any] | None:
    """``api_cost`` of the one-client runs of ``farm-openai`` and ``farm-continuous``, if both ran."""
    at_one = {r.mode: r for r in runs if r.concurrency == 1 and not r.unavailable}
    if API_MODE not in at_one or FARM_MODE not in at_one:
        return None
    return api_cost(at_one[API_MODE].samples, at_one[FARM_MODE].samples)


def api_cost_text(cost: dict[str, Any] | None) -> str:
    if not cost:
        return ""
    return (f"The API's own cost at N=1 ({cost['mode']} minus {cost['baseline']}, delivery overhead = latency "
            f"minus the worker's generate time, median of {cost['pairs']} paired requests): {cost['latency_ms']} ms "
            f"(TTFT {cost['ttft_ms']} ms); delivery overhead p50 {cost['overhead_ms_p50'][cost['mode']]} ms vs "
            f"{cost['overhead_ms_p50'][cost['baseline']]} ms; raw p50 latency difference {cost['raw_p50_diff_ms']} ms.")
