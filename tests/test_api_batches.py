"""The Files and Batch APIs through the real ``openai`` SDK against a real ``farm api`` (which
pumps the batch's job), Redis and worker (tiny model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from bench.api import ApiProcess
from protocol.names import JobKeys, executions_key, job_key
from tests.api_server import module_api_server, sdk_client, start_api
from tests.conftest import ROOT, RedisServer, WorkerProcess, start_worker, wait_until

pytestmark = pytest.mark.integration

CHAT_URL = "/v1/chat/completions"
BATCH_FIELDS = {"id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
                "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at",
                "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts",
                "metadata"}


api_server = module_api_server("api-batch")


@pytest.fixture()
def oai(api_server: ApiProcess) -> openai.OpenAI:
    return sdk_client(api_server)


def jsonl(lines: list[Any]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def chat_line(custom_id: str, text: str, **params: Any) -> dict[str, Any]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 8, **params}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT_URL, "body": body}


def wait_status(oai: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        batch = oai.batches.retrieve(batch_id)
        seen.append(batch.status)
        if batch.status in statuses:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} never reached {statuses}; seen {sorted(set(seen))}")


def read_file(oai: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in oai.files.content(file_id).text.splitlines()]


CREATE_AND_EXIT = """
import sys, openai
oai = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
source = oai.files.create(file=("in.jsonl", open(sys.argv[2], "rb")), purpose="batch")
batch = oai.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h",
                           metadata={"run": "nightly"})
print(batch.id)
"""


def test_a_batch_made_by_a_client_that_exited_completes_with_the_online_answers(
        oai: openai.OpenAI, api_server: ApiProcess, tmp_path: Path) -> None:
    lines = [chat_line(f"req-{i}", f"Batch question {i}") for i in range(6)]
    lines.append(chat_line("two-choices", "Batch question 0", n=2))
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl(lines))
    made = subprocess.run([sys.executable, "-c", CREATE_AND_EXIT, api_server.base_url, str(source)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    batch_id = made.stdout.strip()  # the client process is gone: the API pumps the batch
    done = wait_status(oai, batch_id, ("completed", "failed"))
    assert done.status == "completed" and set(done.model_dump()) >= BATCH_FIELDS
    assert done.request_counts is not None and (done.request_counts.total, done.request_counts.completed) == (7, 7)
    assert done.metadata == {"run": "nightly"} and done.error_file_id is None
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.expires_at
    output = read_file(oai, done.output_file_id)
    assert sorted(o["custom_id"] for o in output) == sorted(line["custom_id"] for line in lines)
    for line, record in zip(lines, output, strict=True):
        online = oai.chat.completions.create(**line["body"])
        body = record["response"]["body"]
        assert record["id"].startswith("batch_req_") and record["error"] is None
        assert record["response"]["status_code"] == 200 and record["response"]["request_id"]
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        assert [c["message"]["content"] for c in body["choices"]] == [c.message.content for c in online.choices]
        assert body["usage"] == online.usage.model_dump(exclude_none=True)  # type: ignore[union-attr]
    assert oai.files.retrieve(done.output_file_id).purpose == "batch_output"  # type: ignore[arg-type]
    assert batch_id in [b.id for b in oai.batches.list(limit=100)]


def test_an_invalid_input_file_fails_with_every_bad_line_and_runs_nothing(
        oai: openai.OpenAI, redis_server: RedisServer) -> None:
    lines: list[Any] = [
        "{not json",
        chat_line("a", "hi", model="gpt-4o"),
        chat_line("b", "fine"),
        chat_line("b", "the same id again"),
        chat_line("c", "too long", max_tokens=5000),
        chat_line("d", "streamed", stream=True),
        {**chat_line("e", "elsewhere"), "url": "/v1/completions"},
    ]
    source = oai.files.create(file=("bad.jsonl", jsonl(lines)), purpose="batch")
    assert source.object == "file" and source.purpose == "batch" and source.bytes == len(jsonl(lines))
    batch = oai.batches.create(input_file_id=source.id, endpoint=CHAT_URL, completion_window="24h")
    batch = wait_status(oai, batch.id, ("failed", "in_progress", "completed"))
    assert batch.status == "failed" and batch.failed_at
    errors = [(e.line, e.param, e.code) for e in batch.errors.data]  # type: ignore[union-attr]
    assert errors == [(1, None, "invalid_json_line"), (2, "body.model", "model_not_found"),
                      (4, "custom_id", "duplicate_custom_id"), (5, "body.max_tokens", "invalid_request"),
                      (6, "body.stream", "invalid_request"), (7, "url", "mismatched_url")]
    assert "line 5: body.max_tokens: must be between 1 and 1024, got 5000" in batch.errors.data[3].message  # type: ignore[union-attr]
    assert not redis_server.client().exists(job_key(batch.id))


def test_cancel_mid_batch_keeps_the_finished_rows_and_never_runs_the_rest(
        oai: openai.OpenAI, redis_server: RedisServer) -> None:
    lines = [chat_line(f"long-{i}", f"A long batch story {i}", max_tokens=300, ignore_eos=True) for i in range(80)]
    source = oai.files.create(file=("long.jsonl", jsonl(lines)), purpose="batch")
    batch = oai.batches.create(input_file_id=source.id, endpoint=CHAT_URL, completion_window="24h")
    deadline = time.monotonic() + 180
    while oai.batches.retrieve(batch.id).request_counts.completed < 1:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no row finished"
        time.sleep(0.1)
    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_status(oai, batch.id, ("cancelled",))
    output, errors = read_file(oai, done.output_file_id), read_file(oai, done.error_file_id)
    assert len(output) + len(errors) == 80 and len({r["custom_id"] for r in output + errors}) == 80
    assert output and all(r["response"]["body"]["usage"]["completion_tokens"] == 300 for r in output)
    assert errors and all(r["error"]["code"] == "batch_cancelled" for r in errors)
    assert done.request_counts.completed == len(output)  # type: ignore[union-attr]
    counts = redis_server.client().hgetall(executions_key())
    ran = {k.decode() for k in counts if k.decode().startswith(f"{batch.id}:")}
    assert all(int(counts[k.encode()]) == 1 for k in ran)
    assert len(ran) < 80  # the rows not started never ran


@pytest.mark.slow
def test_a_2000_line_batch_survives_its_client_its_pumping_replica_and_a_worker(
        redis_server: RedisServer, tiny_model: Path, tmp_path: Path) -> None:
    url, db = redis_server.url("api-batches"), redis_server.client("api-batches")
    db.flushdb()
    settings = {"count_executions": 1, "heartbeat_seconds": 2.0, "max_inflight": 32}
    victim = start_worker(url, tiny_model, tmp_path, name="victim@batch", **settings)
    other = start_worker(url, tiny_model, tmp_path, name="other@batch", **settings)
    first, second = start_api(url, tmp_path / "a"), start_api(url, tmp_path / "b")
    try:
        lines = [chat_line(f"row-{i}", f"Survive {i}", max_tokens=4) for i in range(2000)]
        source = tmp_path / "in.jsonl"
        source.write_bytes(jsonl(lines))
        made = subprocess.run([sys.executable, "-c", CREATE_AND_EXIT, first.base_url, str(source)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, check=True)
        batch_id = made.stdout.strip()  # the client exited
        oai = openai.OpenAI(base_url=second.base_url, api_key="unused", max_retries=2, timeout=120)
        counted = lambda: oai.batches.retrieve(batch_id).request_counts.completed  # noqa: E731
        wait_until(lambda: db.get(JobKeys(batch_id).producer) and counted() >= 100, 300, "the batch did not run")
        holder = int(db.get(JobKeys(batch_id).producer).decode().split(":")[1])  # type: ignore[union-attr]
        pumping = first if holder == first.process.pid else second
        os.kill(pumping.process.pid, signal.SIGKILL)  # the other replica takes the job over
        oai = openai.OpenAI(base_url=(second if pumping is first else first).base_url, api_key="unused",
                            max_retries=2, timeout=120)
        reached = counted()
        wait_until(lambda: counted() >= reached + 100, 300, "the surviving replica did not take over")
        os.kill(victim.process.pid, signal.SIGKILL)  # a worker dies mid-batch: its rows come back
        done = wait_status(oai, batch_id, ("completed", "failed", "expired"), timeout=900)
        output = read_file(oai, done.output_file_id)
    finally:
        for process in (first, second, victim, other):
            process.close() if isinstance(process, ApiProcess) else process.stop()
    assert done.status == "completed" and done.error_file_id is None
    assert len(output) == 2000 and sorted(r["custom_id"] for r in output) == sorted(f"row-{i}" for i in range(2000))


def test_a_batch_past_its_window_expires_with_the_unfinished_rows_as_batch_expired(
        farm_worker: WorkerProcess, tmp_path: Path) -> None:
    server = start_api(farm_worker.redis_url, tmp_path, batch_window_seconds=3)
    try:
        oai = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        lines = [chat_line(f"late-{i}", f"An endless story {i}", max_tokens=1024, ignore_eos=True) for i in range(60)]
        source = oai.files.create(file=("late.jsonl", jsonl(lines)), purpose="batch")
        batch = oai.batches.create(input_file_id=source.id, endpoint=CHAT_URL, completion_window="24h")
        assert batch.expires_at - batch.created_at == 3  # type: ignore[operator]
        done = wait_status(oai, batch.id, ("expired", "completed"))
        output, errors = read_file(oai, done.output_file_id), read_file(oai, done.error_file_id)
    finally:
        server.close()
    assert done.status == "expired" and done.expired_at and done.finalizing_at
    assert len(output) + len(errors) == 60
    assert errors and all(r["error"]["code"] == "batch_expired" and r["response"] is None for r in errors)
