"""``transformers-serve``: ``transformers serve --continuous-batching`` on the same local model,
driven over HTTP (OpenAI ``/v1/completions``, streamed) by N client threads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.procs import free_port, stop
from bench.workload import Clock, Job, Run, Sample, closed_loop

START_TIMEOUT_S = 180.0


def unavailable_reason() -> str | None:
    """Why ``transformers serve`` cannot run here, or ``None``."""
    from transformers.utils.import_utils import is_serve_available

    if shutil.which("transformers", path=str(Path(sys.executable).parent)) is None:
        return "the `transformers` command is not installed next to this Python"
    if not is_serve_available():
        return "serving extras missing (pydantic, fastapi, uvicorn, openai): pip install 'transformers[serving]'"
    return None


class ServeServer:
    """A ``transformers serve`` process on loopback, its KV cache sized explicitly (it otherwise
    takes gigabytes of host RAM), with the benchmark's thread count."""

    def __init__(self, model: str, threads: int, max_batch: int, max_tokens: int, logdir: Path) -> None:
        self.model, self.port = model, free_port()
        block = 32
        blocks = max(64, max_batch * ((max_tokens + block - 1) // block + 1))
        cmd = [str(Path(sys.executable).parent / "transformers"), "serve", model, "--continuous-batching",
               "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", "--dtype", "float32",
               "--cb-block-size", str(block), "--cb-num-blocks", str(blocks),
               "--cb-max-batch-tokens", str(max(512, max_batch * 64)), "--log-level", "warning"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        logdir.mkdir(parents=True, exist_ok=True)
        self.log_path = logdir / "transformers-serve.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=600.0,
                                 limits=httpx.Limits(max_connections=256))
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {self.log_tail()}")
            try:
                if self.http.get("/v1/models").status_code == 200:
                    self.complete(Job(-1, "warm up", 2), Clock())
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"transformers serve not ready after {START_TIMEOUT_S}s: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-800:]

    def complete(self, job: Job, clock: Clock) -> Sample:
        return stream_completion(self.http, self.model, job, clock)

    def close(self) -> None:
        self.http.close()
        stop(self.process)


def stream_completion(http: httpx.Client, model: str, job: Job, clock: Clock,
                      extra: dict[str, Any] | None = None) -> Sample:
    """One streamed OpenAI ``/v1/completions`` request: the client code of every OpenAI-speaking
    mode (``transformers-serve``, ``farm-openai``), so they are compared through one client;
    ``extra`` adds a server's own fields."""
    body = {"model": model, "prompt": job.prompt, "max_tokens": job.new_tokens, "temperature": 0,
            "stream": True, **(extra or {})}
    parts: list[str] = []
    usage = None
    with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(str(event["error"]))
            text = event["choices"][0].get("text") or "" if event.get("choices") else ""
            if text:
                clock.token()
                parts.append(text)
            usage = event.get("usage") or usage
    tokens = int(usage["completion_tokens"]) if usage else 0
    return clock.sample(job, tokens, "".join(parts))


def run_serve(server: ServeServer, jobs: list[Job], concurrency: int) -> Run:
    return closed_loop(jobs, concurrency, lambda job: server.complete(job, Clock()), "transformers-serve")
