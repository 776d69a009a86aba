"""``python -m bench.api_load``: N concurrent streaming connections against one ``farm api``
process on loopback (a private Redis and one tiny-model worker), all opened at once; stops by
itself. Prints errors, complete streams and the API process's peak RSS and CPU as JSON; exits 1
unless every stream completed without error."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.api import ApiProcess
from bench.farm import FarmUnderTest
from protocol.settings import project_root


@dataclass
class Outcome:
    text: str = ""
    finished: bool = False
    done: bool = False
    error: str | None = None


@dataclass
class Usage:
    """The API process's resources, sampled while the connections run."""

    process: psutil.Process
    peak_rss: int = 0
    samples: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        self.process.cpu_percent()
        while not self._stop.wait(0.25):
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            self.samples.append(self.process.cpu_percent())

    def stop(self) -> None:
        self._stop.set()


async def one(http: httpx.AsyncClient, model: str, i: int, new_tokens: int) -> Outcome:
    body = {"model": model, "messages": [{"role": "user", "content": f"Load {i}: tell a story"}],
            "max_tokens": new_tokens, "ignore_eos": True, "stream": True}
    outcome = Outcome()
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return Outcome(error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                _take(outcome, line)
    except httpx.HTTPError as error:
        outcome.error = f"{type(error).__name__}: {error}"
    return outcome


def _take(outcome: Outcome, line: str) -> None:
    if line == "data: [DONE]":
        outcome.done = True
    elif line.startswith("data: "):
        event = json.loads(line[6:])
        if "error" in event:
            outcome.error = str(event["error"])
        for choice in event.get("choices", []):
            outcome.text += choice["delta"].get("content") or ""
            outcome.finished = outcome.finished or choice.get("finish_reason") is not None


async def drive(base_url: str, model: str, connections: int, new_tokens: int) -> list[Outcome]:
    limits = httpx.Limits(max_connections=connections + 10, max_keepalive_connections=connections + 10)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(600, connect=60)) as http:
        return list(await asyncio.gather(*(one(http, model, i, new_tokens) for i in range(connections))))


def run(connections: int, new_tokens: int, workdir: Path) -> dict[str, Any]:
    from ops.make_model import ensure_model

    model = ensure_model(project_root() / ".farm" / "test-models" / "tiny", "tiny")
    farm = FarmUnderTest(str(model), "continuous", 1, 64, new_tokens, workdir)
    try:
        api = ApiProcess(farm.url, workdir, api_max_queue=connections * 2)
        try:
            return _measure(api, connections, new_tokens)
        finally:
            api.close()
    finally:
        farm.close()


def _measure(api: ApiProcess, connections: int, new_tokens: int) -> dict[str, Any]:
    usage = Usage(psutil.Process(api.process.pid))
    sampler = threading.Thread(target=usage.run, daemon=True)
    sampler.start()
    cpu_before, started = usage.process.cpu_times(), time.monotonic()
    outcomes = asyncio.run(drive(api.root, "tiny", connections, new_tokens))
    wall, cpu_after = time.monotonic() - started, usage.process.cpu_times()
    usage.stop()
    errors = [o.error for o in outcomes if o.error]
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    return {"connections": connections, "new_tokens": new_tokens, "errors": len(errors),
            "first_errors": errors[:3], "complete": sum(o.done and o.finished and not o.error for o in outcomes),
            "seconds": round(wall, 1), "api_peak_rss_mb": round(usage.peak_rss / 2**20, 1),
            "api_cpu_seconds": round(cpu, 2), "api_cpu_percent_mean": round(cpu / wall * 100, 1),
            "api_cpu_percent_peak": max(usage.samples, default=0.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_load", description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--logs", type=Path, default=project_root() / "test-output" / "api-load",
                        help="where the Redis, worker and API logs go")
    args = parser.parse_args(argv)
    report = run(args.connections, args.new_tokens, args.logs)
    print(json.dumps(report, indent=2))
    return 0 if report["errors"] == 0 and report["complete"] == args.connections else 1


if __name__ == "__main__":
    sys.exit(main())
