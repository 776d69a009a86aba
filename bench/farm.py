"""``farm``: N concurrent clients through Redis and a real worker process, per batching strategy.

Each client submits with ``FarmClient`` (validation, Redis, Celery), reads the request's stream to
see its first token, and waits for the stored result: everything a real client pays for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from bench.procs import start_redis, stop, wait_for
from bench.workload import Clock, Job, Run, Sample, closed_loop
from protocol.names import heartbeat_key
from protocol.settings import project_root

WORKER_NAME = "bench@local"
READY_TIMEOUT_S = 300.0


class FarmUnderTest:
    """A private redis-server and one CPU worker with the given strategy."""

    def __init__(self, model: str, strategy: str, threads: int, max_batch: int, max_new_tokens: int,
                 logdir: Path, prompt_tokens: int = 512, extra_env: dict[str, str] | None = None,
                 tag: str = "") -> None:
        """``prompt_tokens``: the longest prompt the batch token budget must hold for ``max_batch``
        rows; ``extra_env`` adds settings of the worker; ``tag`` names its logs (default: the strategy)."""
        self.strategy, tag = strategy, tag or strategy
        self.redis_process, self.url = start_redis(logdir / f"redis-{tag}")
        env = {**os.environ, "PYTHONPATH": str(project_root()), "FARM_REDIS_URL": self.url, "FARM_MODEL": model,
               "FARM_STRATEGY": strategy, "FARM_WORKER_NAME": WORKER_NAME, "FARM_TORCH_THREADS": str(threads),
               "FARM_MAX_BATCH_SIZE": str(max_batch), "FARM_MAX_INFLIGHT": str(max(64, max_batch)),
               "FARM_MAX_BATCH_TOKENS": str(max_batch * (max_new_tokens + prompt_tokens)),
               "FARM_MAX_NEW_TOKENS": str(max(1024, max_new_tokens)), "FARM_HEARTBEAT_SECONDS": "1",
               "FARM_ADAPTER": "", "FARM_ADAPTERS": "", "FARM_QUANT": "none", "FARM_DTYPE": "float32",
               **(extra_env or {})}
        self.log_path = logdir / f"worker-{tag}.log"
        with open(self.log_path, "wb") as log:
            self.worker = subprocess.Popen([sys.executable, "-m", "worker.main", "--device", "cpu"], env=env,
                                           cwd=project_root(), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(self.ready, READY_TIMEOUT_S, "worker did not become ready")
        except RuntimeError:
            self.close()
            raise
        from producer import FarmClient

        self.client = FarmClient(self.url)

    def ready(self) -> bool:
        """Whether the worker runs and its heartbeat is there (at start, and again after a pause)."""
        if self.worker.poll() is not None:
            raise RuntimeError(f"worker exited: {self.log_path.read_text(errors='replace')[-800:]}")
        return bool(redis.Redis.from_url(self.url).exists(heartbeat_key(WORKER_NAME)))

    def request(self, job: Job) -> Sample:
        clock = Clock()
        handle = self.client.submit(job.prompt, max_new_tokens=job.new_tokens, ignore_eos=True)
        for event in handle.events(timeout=3600):
            if event["type"] == "delta" and event.get("text"):
                clock.token()
        result = handle.result(timeout=600)
        error = None if result.ok else str(result.error)
        return clock.sample(job, result.completion_tokens, result.text, error).with_farm_times(result)

    def close(self) -> None:
        stop(self.worker)
        stop(self.redis_process)


def run_farm(farm: FarmUnderTest, jobs: list[Job], concurrency: int, mode: str | None = None) -> Run:
    return closed_loop(jobs, concurrency, farm.request, mode or f"farm-{farm.strategy}")
