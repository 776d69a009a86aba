"""What every mode runs: the same prompts (mixed lengths), the same new tokens, EOS ignored, and
the measurement of one request (latency, time to first token, text)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from bench.overhead import overhead_stats

T = TypeVar("T")

PROMPT_WORDS = (6, 28, 12, 36, 9, 20, 31, 15)
"""Prompt lengths in words, cycled: a mix of short and long prompts (about 10 to 50 tokens)."""


def _words() -> list[str]:
    from pydoc_data.topics import topics

    return " ".join(topics[key] for key in sorted(topics)).split()


def make_prompts(count: int) -> list[str]:
    """``count`` deterministic English prompts of mixed lengths (Python's own help texts)."""
    words = _words()
    prompts, start = [], 0
    for i in range(count):
        size = PROMPT_WORDS[i % len(PROMPT_WORDS)]
        prompts.append(" ".join(words[start:start + size]))
        start += size * 7 + 13
    return prompts


def shared_prefix(tokens: int, count_tokens: Callable[[str], int]) -> str:
    """English text (from the end of the help texts, away from the prompts) of as many whole
    words as fit in ``tokens`` tokens, counted by ``count_tokens`` (the model's tokenizer, without
    special tokens)."""
    if tokens < 1:
        raise ValueError(f"--shared-prefix must be at least 1 token, got {tokens}")
    words = _words()[-4 * tokens:]
    low, high = 0, min(len(words), tokens)  # every word is at least one token
    while low < high:  # the most words whose text fits
        middle = (low + high + 1) // 2
        if count_tokens(" ".join(words[:middle])) <= tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


def with_prefix(prefix: str, prompts: list[str]) -> list[str]:
    """Every prompt behind the same prefix, on a line of its own (the prefix's tokens do not
    merge with the prompt's)."""
    return [f"{prefix}\n\n{prompt}" for prompt in prompts]


@dataclass(frozen=True)
class Job:
    """One request of a run: which prompt and how many new tokens."""

    index: int
    prompt: str
    new_tokens: int
    kind: str = "normal"
    """``short`` or ``long`` in the mixed-length scenario."""


@dataclass
class Sample:
    """One finished request as the client saw it."""

    index: int
    kind: str
    latency: float
    ttft: float | None
    tokens: int
    text: str
    error: str | None = None
    farm_queue: float | None = None
    """The farm's own times of the request (``GenerationResult``), for a farm mode: enqueue to
    batch start, batch start to last token, batch start to first token (``bench.overhead``)."""
    farm_generate: float | None = None
    farm_first_token: float | None = None

    def with_farm_times(self, result: Any) -> Sample:
        """This sample with the farm's times of its request (a ``GenerationResult``)."""
        self.farm_queue, self.farm_generate = result.queue_seconds, result.generate_seconds
        self.farm_first_token = result.first_token_seconds
        return self


@dataclass
class Run:
    """One mode at one concurrency: its samples and wall time."""

    mode: str
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0
    note: str = ""
    unavailable: str | None = None

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.error is None]
        tokens = sum(s.tokens for s in ok)
        out: dict[str, Any] = {"mode": self.mode, "concurrency": self.concurrency, "requests": len(self.samples),
                               "errors": len(self.samples) - len(ok), "note": self.note}
        if self.unavailable:
            return {**out, "unavailable": self.unavailable}
        out.update({"wall_seconds": round(self.wall, 3), "tokens": tokens,
                    "tokens_per_s": round(tokens / self.wall, 2) if self.wall else 0.0,
                    "requests_per_s": round(len(ok) / self.wall, 3) if self.wall else 0.0})
        out.update(_latency_stats(ok, "latency"))
        out.update(overhead_stats(self.samples))
        for kind in sorted({s.kind for s in ok} - {"normal"}):
            out.update(_latency_stats([s for s in ok if s.kind == kind], f"{kind}_latency"))
        return out

    def to_dict(self, with_texts: bool = False) -> dict[str, Any]:
        data = self.summary()
        if with_texts:
            data["samples"] = [asdict(s) for s in self.samples]
        return data


def _latency_stats(samples: list[Sample], prefix: str) -> dict[str, float | None]:
    latencies = sorted(s.latency for s in samples)
    ttfts = sorted(s.ttft for s in samples if s.ttft is not None)
    return {f"{prefix}_p50": _pct(latencies, 50), f"{prefix}_p95": _pct(latencies, 95),
            f"{prefix.replace('latency', 'ttft')}_p50": _pct(ttfts, 50)}


def _pct(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 4)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1], 4)


class Clock:
    """Times one request: start, first token, end."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def sample(self, job: Job, tokens: int, text: str, error: str | None = None) -> Sample:
        end = time.perf_counter()
        ttft = None if self.first is None else self.first - self.start
        return Sample(job.index, job.kind, end - self.start, ttft, tokens, text, error)


def closed_loop(jobs: list[Job], concurrency: int, serve: Callable[[Job], Sample], mode: str) -> Run:
    """``concurrency`` clients, each sending its next request when the previous one returns."""
    run = Run(mode, concurrency)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        run.samples = list(pool.map(lambda job: _safe(serve, job), jobs))
    run.wall = time.perf_counter() - started
    return run


def _safe(serve: Callable[[Job], Sample], job: Job) -> Sample:
    clock = Clock()
    try:
        return serve(job)
    except Exception as error:  # noqa: BLE001 - a failed request is a data point, not a crash
        return clock.sample(job, 0, "", f"{type(error).__name__}: {error}")


def chunks(items: list[Job], size: int) -> Iterator[list[Job]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
