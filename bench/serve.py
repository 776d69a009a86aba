"""``transformers-serve``: ``transformers serve --continuous-batching`` on the same local model,
driven over HTTP (OpenAI ``/v1/completions``, streamed, through the ``openai`` SDK) by N client threads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
        self.client = openai_client(f"http://127.0.0.1:{self.port}/v1")
        # EOS ignored as in every mode: a generation config of the request's own (transformers
        # serve's extension), the model's with no end-of-sequence token (-1: none).
        self.extra = {"generation_config": json.dumps({**_generation_config(model), "eos_token_id": -1})}
        try:
            self._wait_ready()
        except RuntimeError:
            self.close()
            raise

    def _wait_ready(self) -> None:
        import openai

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {self.log_tail()}")
            try:
                self.client.models.list()
            except openai.APIError:
                time.sleep(0.5)
                continue
            self.complete(Job(-1, "warm up", 2), Clock())
            return
        raise RuntimeError(f"transformers serve not ready after {START_TIMEOUT_S}s: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-800:]

    def complete(self, job: Job, clock: Clock) -> Sample:
        return stream_completion(self.client, self.model, job, clock, self.extra)

    def close(self) -> None:
        self.client.close()
        stop(self.process)


def _generation_config(model: str) -> dict[str, Any]:
    path = Path(model) / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config.pop("transformers_version", None)
    return {**config, "do_sample": False}


def openai_client(base_url: str) -> Any:
    """The OpenAI SDK client of every OpenAI-speaking mode: no retries (a failed request is a
    data point); its default pool keeps 100 connections alive, more than the most clients."""
    import openai

    return openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600.0)


def stream_completion(client: Any, model: str, job: Job, clock: Clock, extra: dict[str, Any] | None = None,
                      headers: dict[str, str] | None = None) -> Sample:
    """One streamed OpenAI ``/v1/completions`` request through the ``openai`` SDK: the client code
    of every OpenAI-speaking mode (``transformers-serve``, ``farm-openai``), so they are compared
    through one client; ``extra`` adds a server's own fields to the body; ``headers``, if given,
    receives the response's headers (``farm-openai`` finds its farm request there)."""
    stream = client.completions.create(model=model, prompt=job.prompt, max_tokens=job.new_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True}, extra_body=extra)
    if headers is not None:
        headers.update(stream.response.headers)
    parts: list[str] = []
    usage = None
    for chunk in stream:
        text = chunk.choices[0].text if chunk.choices else ""
        if text:
            clock.token()
            parts.append(text)
        usage = chunk.usage or usage
    tokens = int(usage.completion_tokens) if usage else 0
    return clock.sample(job, tokens, "".join(parts))


def run_serve(server: ServeServer, jobs: list[Job], concurrency: int) -> Run:
    return closed_loop(jobs, concurrency, lambda job: server.complete(job, Clock()), "transformers-serve")
