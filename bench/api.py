"""``farm-openai``: the farm behind ``farm api``, driven by the same ``openai`` SDK client code as
``transformers-serve`` (``bench.serve.stream_completion``); and ``ApiProcess``, one ``farm api``
process on loopback (the load test and the API tests start theirs through it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.procs import free_port, stop, wait_for
from bench.workload import Clock, Job, Run, Sample, closed_loop
from protocol.settings import project_root

START_TIMEOUT_S = 60.0
RESULT_TIMEOUT_S = 60.0
FARM_FIELDS = {"ignore_eos": True}
"""The farm's own request field (``ignore_eos``), as every mode generates its full length."""


class ApiProcess:
    """``farm api`` on a free loopback port, its output in a log; ready once ``/health`` answers."""

    def __init__(self, redis_url: str, logdir: Path, *args: str, **settings: object) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(project_root()), "FARM_REDIS_URL": redis_url,
               "FARM_API_PORT": str(self.port), **{f"FARM_{k.upper()}": str(v) for k, v in settings.items()}}
        logdir.mkdir(parents=True, exist_ok=True)
        self.log_path = logdir / f"api-{self.port}-{int(time.time() * 1000)}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "api.main", *args], env=env,
                                            cwd=project_root(), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(self._answers, START_TIMEOUT_S, "farm api did not start")
        except RuntimeError:
            self.close()
            raise

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"farm api exited with {self.process.returncode}: {self.log()[-3000:]}")
        try:
            return httpx.get(f"{self.root}/health", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        stop(self.process)


class FarmOpenAI:
    """``farm api`` in front of a ``bench.farm.FarmUnderTest``, driven through the ``openai`` SDK."""

    def __init__(self, redis_url: str, model: str, logdir: Path, clients: int) -> None:
        from api.farm import model_id
        from bench.serve import openai_client

        self.model = model_id(model)
        self.api = ApiProcess(redis_url, logdir, api_max_queue=max(256, 4 * clients))
        self.client = openai_client(self.api.base_url)
        from producer import FarmClient

        self.farm = FarmClient(redis_url)
        """Reads the stored result of each completion's farm request, once the client has it all."""

    def complete(self, job: Job) -> Sample:
        """One streamed completion; then (off the clock) the farm's own times of its request,
        found by the API's ``X-Farm-Request-Ids`` header (``bench.overhead``)."""
        from api.app import REQUEST_IDS_HEADER
        from bench.serve import stream_completion

        headers: dict[str, str] = {}
        sample = stream_completion(self.client, self.model, job, Clock(), FARM_FIELDS, headers)
        request_id = {k.lower(): v for k, v in headers.items()}.get(REQUEST_IDS_HEADER.lower(), "").split(",")[0]
        if request_id and sample.error is None:
            sample.with_farm_times(self.farm.handle(request_id).result(timeout=RESULT_TIMEOUT_S))
        return sample

    def close(self) -> None:
        self.client.close()
        self.api.close()


def run_openai(server: FarmOpenAI, jobs: list[Job], concurrency: int) -> Run:
    return closed_loop(jobs, concurrency, server.complete, "farm-openai")
