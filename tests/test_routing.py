"""One farm, several models: requests routed by model name on Celery's own queues (issue 14).

Two real workers on one Redis db serve two different models: the tiny test model (``tiny``) and
a second tiny model built with another seed (``tiny2``); a third (``spare``) is started and
stopped to show what a model without a live worker does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from producer import FarmClient
from protocol.errors import NoWorkerError, RequestError
from protocol.names import model_queue
from protocol.settings import FarmSettings
from tests.conftest import (MODEL_CACHE, ROOT, RedisServer, WorkerProcess, free_port, start_worker, stop_process,
                            wait_until)
from tests.helpers import PROMPTS, reference_text

DB = "routing"
SECOND_SEED = 7


@dataclass
class TwoModels:
    client: FarmClient
    dirs: dict[str, Path]
    workers: dict[str, WorkerProcess]

    def worker_of(self, model: str) -> str:
        return self.workers[model].name


@pytest.fixture(scope="module")
def second_model() -> Path:
    """The tiny recipe with another seed: same tokenizer, other weights (built once, cached)."""
    from ops.make_model import ensure_model

    return ensure_model(MODEL_CACHE / f"tiny-seed{SECOND_SEED}", "tiny", seed=SECOND_SEED)


@pytest.fixture(scope="module")
def farm(redis_server: RedisServer, tiny_model: Path, second_model: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoModels]:
    redis_server.client(DB).flushdb()
    logs = tmp_path_factory.mktemp("routing")
    dirs = {"tiny": tiny_model, "tiny2": second_model}
    workers: dict[str, WorkerProcess] = {}
    try:
        for name, path in dirs.items():
            workers[name] = start_worker(redis_server.url(DB), path, logs, name=f"{name}@test", model_name=name,
                                         adapter=path / "adapter", max_batch_size=16, max_wait_ms=20)
        yield TwoModels(FarmClient(redis_server.url(DB)), dirs, workers)
    finally:
        for worker in workers.values():
            worker.stop()
        redis_server.client(DB).flushdb()


def run_all(client: FarmClient, requests: list[dict[str, object]]) -> list:  # type: ignore[type-arg]
    with ThreadPoolExecutor(len(requests)) as pool:
        handles = list(pool.map(lambda r: client.submit(**r), requests))
    return [h.result(timeout=120) for h in handles]


def test_the_client_lists_the_models_served_with_their_adapters_and_workers(farm: TwoModels) -> None:
    models = {m.name: m for m in farm.client.models()}
    assert sorted(models) == ["tiny", "tiny2"]
    for name in ("tiny", "tiny2"):
        assert models[name].workers == (farm.worker_of(name),)
        assert models[name].adapters == ("base", "default")
        assert models[name].ids() == [name, f"{name}:default"]
        assert models[name].queues[:2] == (model_queue("interactive", name), "interactive")


def test_requests_for_each_model_are_served_only_by_its_worker(farm: TwoModels) -> None:
    requests = [{"prompt": p, "model": m, "max_new_tokens": 8} for p in PROMPTS for m in ("tiny", "tiny2")]
    results = run_all(farm.client, requests)
    for request, result in zip(requests, results, strict=True):
        assert result.ok, result.error
        assert (result.model, result.worker) == (request["model"], farm.worker_of(str(request["model"])))


def test_greedy_outputs_per_model_equal_that_model_alone(farm: TwoModels) -> None:
    prompts = PROMPTS[:4]
    requests = [{"prompt": p, "model": m, "max_new_tokens": 12, "adapter": "base"}
                for p in prompts for m in ("tiny", "tiny2")]
    results = run_all(farm.client, requests)  # both models at once, batched with their neighbours
    texts = {(r["model"], r["prompt"]): res.text for r, res in zip(requests, results, strict=True)}
    for model, path in farm.dirs.items():
        for prompt in prompts:
            assert texts[(model, prompt)] == reference_text(path, prompt, 12), (model, prompt)
    assert any(texts[("tiny", p)] != texts[("tiny2", p)] for p in prompts)  # two models, not one twice


def test_model_and_adapter_in_one_name(farm: TwoModels) -> None:
    result = farm.client.generate("The list type", model="tiny2:default", max_new_tokens=6, timeout=60)
    assert (result.model, result.adapter, result.worker) == ("tiny2", "default", farm.worker_of("tiny2"))
    with pytest.raises(RequestError, match="adapter: unknown adapter 'pirate'"):
        farm.client.submit("x", model="tiny:pirate")


def test_a_mixed_bulk_job_puts_every_row_on_its_models_worker(farm: TwoModels) -> None:
    rows = [{"prompt": f"row {i} of a mixed job", "model": "tiny2" if i % 3 else "tiny"} for i in range(200)]
    job = farm.client.submit_job(rows, window=64, max_new_tokens=3)
    results = list(job.results(timeout=240))
    assert [r.id for r in results] == [f"{job.id}:{i}" for i in range(200)]
    for row, result in zip(rows, results, strict=True):
        assert result.ok and (result.model, result.worker) == (row["model"], farm.worker_of(str(row["model"])))
    whole = farm.client.submit_job([f"all on tiny2 {i}" for i in range(10)], model="tiny2", max_new_tokens=2)
    assert {(r.model, r.worker) for r in whole.results(timeout=60)} == {("tiny2", farm.worker_of("tiny2"))}


def test_farm_submit_routes_by_option_and_by_row(farm: TwoModels, tmp_path: Path) -> None:
    from producer.cli import main

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"cli row {i}", **({"model": "tiny"} if i % 2 else {})}) + "\n"
                            for i in range(6)))
    out = tmp_path / "out.jsonl"
    url = farm.client.settings.redis_url
    assert main(["submit", str(rows), "-o", str(out), "--model", "tiny2", "--max-new-tokens", "2", "--quiet",
                 "--redis-url", url]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["model"], r["worker"]) for r in lines] == [
        ("tiny", farm.worker_of("tiny")) if i % 2 else ("tiny2", farm.worker_of("tiny2")) for i in range(6)]


def test_an_unknown_model_is_refused_with_the_models_served(farm: TwoModels) -> None:
    before = farm.client.queue_depths()
    with pytest.raises(RequestError, match=r"model: unknown model 'nope' \(served: tiny, tiny2\)") as refused:
        farm.client.submit("hello", model="nope")
    assert refused.value.code == "unknown_model"
    with pytest.raises(RequestError, match="unknown model 'nope'"):
        farm.client.submit_job(["a", "b"], model="nope")
    with pytest.raises(RequestError, match=r"model: several models are served \(tiny, tiny2\): name one"):
        farm.client.submit("which model?")
    assert farm.client.queue_depths() == before


@pytest.mark.timeout(180)
def test_a_model_without_a_live_worker_fails_interactive_requests_and_its_bulk_rows_wait(
        farm: TwoModels, redis_server: RedisServer, tmp_path: Path) -> None:
    spare = start_worker(redis_server.url(DB), farm.dirs["tiny"], tmp_path, name="spare@test", model_name="spare")
    try:
        assert farm.client.generate("Hello", model="spare", max_new_tokens=4, timeout=60).worker == "spare@test"
    finally:
        spare.stop()
    error = _first_refusal(farm.client, "spare")
    assert (error.code, str(error)) == ("no_worker", "no worker serves model spare; models served now: tiny, tiny2")
    assert farm.client.generate("Hello", model="tiny", max_new_tokens=4, timeout=60).ok  # the other serves on
    job = farm.client.submit_job([f"waiting row {i}" for i in range(5)], model="spare", max_new_tokens=2)
    wait_until(lambda: farm.client.queue_depths().get("bulk.spare") == 5, 30, "bulk rows not queued")
    back = start_worker(redis_server.url(DB), farm.dirs["tiny"], tmp_path, name="spare@test", model_name="spare")
    try:
        assert {(r.model, r.ok) for r in job.results(timeout=120)} == {("spare", True)}
    finally:
        back.stop()


def _first_refusal(client: FarmClient, model: str) -> NoWorkerError:
    """Interactive requests until one is refused (the stopped worker's heartbeat is gone); the
    test's timeout is the guard."""
    while True:
        try:
            client.submit("Hello", model=model, max_new_tokens=2)
        except NoWorkerError as error:
            return error


@pytest.mark.timeout(400)
def test_farm_up_serves_one_worker_group_per_model(tiny_model: Path, second_model: Path,
                                                   tmp_path: Path) -> None:
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update({"PYTHONPATH": str(ROOT), "FARM_REDIS_URL": redis_url, "FARM_HEARTBEAT_SECONDS": "0.5"})
    cmd = [sys.executable, "-m", "ops.cli", "up", "--gpus", "none", "--no-ui", "--metrics-port", "0",
           "--flower-port", str(free_port()), "--data-dir", str(tmp_path),
           "--model", f"tiny={tiny_model}", "--model", f"tiny2={second_model}"]
    log_path = tmp_path / "farm-up.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: process.poll() is not None or "[farm] ready:" in log_path.read_text(), 300, "not ready")
        assert process.poll() is None, log_path.read_text()[-3000:]
        host = socket.gethostname()
        client = FarmClient(settings=FarmSettings(redis_url=redis_url, default_model="tiny"))
        assert {m.name: m.workers for m in client.models()} == {"tiny": (f"tiny-cpu@{host}",),
                                                                "tiny2": (f"tiny2-cpu@{host}",)}
        named = client.generate("The list type", model="tiny2", max_new_tokens=4, timeout=60)
        unnamed = client.generate("The list type", max_new_tokens=4, timeout=60)  # the default: the first
        assert [(r.model, r.worker) for r in (named, unnamed)] == [("tiny2", f"tiny2-cpu@{host}"),
                                                                   ("tiny", f"tiny-cpu@{host}")]
        status = subprocess.run([sys.executable, "-m", "ops.cli", "status"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        for part in ("Models served: 2", "tiny2-cpu@", "interactive.tiny2", "bulk.tiny"):
            assert part in status.stdout, (part, status.stdout)
    finally:
        stop_process(process, timeout=90)
