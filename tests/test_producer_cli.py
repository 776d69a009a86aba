"""``farm submit``, ``farm job`` and ``farm generate`` as a user runs them: subprocesses against a
real Redis and the shared tiny-model worker."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer import FarmClient
from producer.files import result_line
from protocol.errors import RequestError
from protocol.names import BULK_QUEUE, executions_key, job_key
from protocol.schema import GenerationResult
from tests.conftest import OUTPUT, ROOT, WorkerProcess, free_port, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture()
def workdir(request: pytest.FixtureRequest) -> Path:
    path = OUTPUT / "producer" / request.node.name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def farm_env(redis_url: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "FARM_REDIS_URL": redis_url}


def farm(redis_url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], cwd=ROOT, env=farm_env(redis_url),
                          capture_output=True, text=True, timeout=timeout)


def prompt_file(path: Path, tag: str, count: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{tag} row {i}"}) + "\n" for i in range(count)))
    return path


def read_lines(path: Path) -> list[dict[str, object]]:
    """Complete lines only: a producer still running may be halfway through writing the last one."""
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines()]


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_killed_producer_resumes_with_every_row_once(farm_worker: WorkerProcess, workdir: Path) -> None:
    url = farm_worker.redis_url
    prompts, out = prompt_file(workdir / "prompts.jsonl", f"kill {time.time()}", 2000), workdir / "out.jsonl"
    command = [sys.executable, "-m", "ops.cli", "submit", str(prompts), "-o", str(out), "--max-new-tokens", "3"]
    target = random.randint(0, 1500)  # lines written when the producer is killed; 0: as soon as it runs
    with open(workdir / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, env=farm_env(url), stderr=log)
    try:
        wait_until(lambda: first.poll() is not None or ("farm submit: job" in (workdir / "first.log").read_text()
                                                        and count_lines(out) >= target), 120, "no progress")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    assert first.returncode == -signal.SIGKILL, f"the job ended before the kill (target {target} lines)"
    killed_at = count_lines(out)
    assert killed_at < 2000, target
    with open(out, "ab") as handle:  # as if killed in the middle of writing a line
        handle.write(b'{"index": ' + str(killed_at).encode() + b', "job_id": "j')

    second = subprocess.run(command, cwd=ROOT, env=farm_env(url), capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    lines = read_lines(out)
    assert [line["index"] for line in lines] == list(range(2000)), (target, killed_at)
    (job_id,) = {line["job_id"] for line in lines}
    assert [line["id"] for line in lines] == [f"{job_id}:{i}" for i in range(2000)]
    assert all(line["finish_reason"] == "length" for line in lines)
    counts = {k.decode(): int(v) for k, v in farm_worker_redis(url).hgetall(executions_key()).items()
              if k.decode().startswith(f"{job_id}:")}
    assert len(counts) == 2000 and set(counts.values()) == {1}, (target, killed_at)


def farm_worker_redis(url: str):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(url)


def test_job_cancel_from_another_process_stops_a_running_submit(farm_worker: WorkerProcess, workdir: Path) -> None:
    url = farm_worker.redis_url
    prompts, out = prompt_file(workdir / "prompts.jsonl", f"remote {time.time()}", 1000), workdir / "out.jsonl"
    with open(workdir / "submit.log", "w") as log:
        submit = subprocess.Popen([sys.executable, "-m", "ops.cli", "submit", str(prompts), "-o", str(out),
                                   "--max-new-tokens", "16", "--quiet"], cwd=ROOT, env=farm_env(url), stderr=log)
    try:
        wait_until(lambda: count_lines(out) >= 20 or submit.poll() is not None, 120, "the job did not start")
        job_id = str(read_lines(out)[0]["job_id"])
        status = json.loads(farm(url, "job", "status", job_id, "--json").stdout)
        assert status["state"] == "running" and status["total"] == 1000
        with pytest.raises(RequestError, match=f"job {job_id} is being submitted by another producer"):
            FarmClient(url).submit_job(["a second producer"], job_id)
        cancel = farm(url, "job", "cancel", job_id)
        assert cancel.returncode == 0 and f"job {job_id}: cancelled" in cancel.stdout, cancel.stderr
        assert submit.wait(60) == 1  # some rows cancelled
    finally:
        if submit.poll() is None:
            submit.kill()
    lines = read_lines(out)
    assert [line["index"] for line in lines] == list(range(1000))
    reasons = [line["finish_reason"] for line in lines]
    assert set(reasons) == {"length", "cancelled"} and reasons.count("cancelled") > 500
    status = json.loads(farm(url, "job", "status", job_id, "--json").stdout)
    assert (status["state"], status["pending"], status["cancelled"]) == ("cancelled", 0, reasons.count("cancelled"))


def test_job_status_from_another_process_shows_rates_mid_run_and_when_finished(farm_worker: WorkerProcess) -> None:
    url = farm_worker.redis_url
    job = FarmClient(url).submit_job([f"rates {time.time()} row {i}" for i in range(300)], max_new_tokens=8)
    wait_until(lambda: job.progress().done >= 20, 120, "no rows finished")
    status = json.loads(farm(url, "job", "status", job.id, "--json").stdout)
    assert status["done"] >= 20 and status["rows_per_second"] > 0 and status["tokens_per_second"] > 0, status
    job.wait(timeout=300)
    status = json.loads(farm(url, "job", "status", job.id, "--json").stdout)
    assert (status["state"], status["done"]) == ("finished", 300)
    assert status["rows_per_second"] > 0 and status["tokens_per_second"] > 0, status
    assert " 0.0 rows/s" not in farm(url, "job", "status", job.id).stdout
    assert job.progress().rows_per_second > 0  # the submitting process too, once the job is over


def test_bad_jsonl_line_is_one_line_and_leaves_the_output_alone(workdir: Path) -> None:
    prompts = workdir / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "also fine"}\n{"prompt": "broken",\n{"prompt": "x"}\n')
    out = workdir / "out.jsonl"
    done = result_line("j1", 0, GenerationResult(id="j1:0", text="earlier"))
    out.write_text(done)
    run = farm("redis://127.0.0.1:1/0", "submit", str(prompts), "-o", str(out))
    assert run.returncode == 2
    assert one_line(run.stderr).startswith(f"farm submit: {prompts} line 3: not valid JSON")
    assert out.read_text() == done
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "x", "temperature": "hot"}\n')
    run = farm("redis://127.0.0.1:1/0", "submit", str(prompts), "-o", str(workdir / "new.jsonl"))
    assert one_line(run.stderr) == f"farm submit: {prompts} line 2: temperature: must be a number, got str"
    assert run.returncode == 2 and not (workdir / "new.jsonl").exists()


def test_missing_file_is_one_line(workdir: Path) -> None:
    run = farm("redis://127.0.0.1:1/0", "submit", str(workdir / "nope.jsonl"), "-o", str(workdir / "out.jsonl"))
    assert run.returncode == 2
    assert one_line(run.stderr) == f"farm submit: {workdir / 'nope.jsonl'}: cannot read: No such file or directory"
    assert not (workdir / "out.jsonl").exists()


def test_unreachable_redis_names_the_url_and_what_to_start(workdir: Path) -> None:
    prompts, out = prompt_file(workdir / "prompts.jsonl", "unreachable", 3), workdir / "out.jsonl"
    url = f"redis://127.0.0.1:{free_port()}/0"
    run = farm(url, "submit", str(prompts), "-o", str(out))
    assert run.returncode == 1
    message = one_line(run.stderr)
    assert message.startswith(f"farm submit: Redis at {url} is unreachable") and "farm up" in message
    assert not out.exists()


def test_generate_streams_one_completion(farm_worker: WorkerProcess) -> None:
    run = farm(farm_worker.redis_url, "generate", "Once upon a time", "--max-new-tokens", "6")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    assert "[6 tokens, length, cpu@test" in run.stderr
    bad = farm(farm_worker.redis_url, "generate", "x", "--max-new-tokens", "0")
    assert bad.returncode == 2
    assert one_line(bad.stderr) == "farm generate: max_new_tokens: must be between 1 and 1024, got 0"


def farm_state(url: str) -> tuple[list[bytes], int]:
    """The jobs' keys in Redis and the messages waiting in the bulk queue."""
    redis = farm_worker_redis(url)
    return sorted(redis.scan_iter(match=job_key("*"))), int(redis.llen(BULK_QUEUE))


def test_an_unknown_adapter_in_the_file_is_refused_with_its_line_before_anything_is_created(
        farm_worker: WorkerProcess, workdir: Path) -> None:
    url, prompts, out = farm_worker.redis_url, workdir / "prompts.jsonl", workdir / "out.jsonl"
    offered = FarmClient(url).limits().adapters
    assert offered and "nosuch" not in offered
    prompts.write_text(f'{{"prompt": "a", "adapter": "{offered[-1]}"}}\n\n{{"prompt": "b", "adapter": "nosuch"}}\n')
    before = farm_state(url)
    run = farm(url, "submit", str(prompts), "-o", str(out))
    assert run.returncode == 2
    assert one_line(run.stderr) == (f"farm submit: {prompts} line 3: adapter: unknown adapter 'nosuch' "
                                    f"(offered: {', '.join(offered)})")
    assert not out.exists() and farm_state(url) == before


def test_a_reused_job_id_with_other_prompts_is_refused_by_the_api_check(farm_worker: WorkerProcess,
                                                                        workdir: Path) -> None:
    url, out = farm_worker.redis_url, workdir / "out.jsonl"
    job_id = f"reuse-{time.time_ns()}"
    first = farm(url, "submit", str(prompt_file(workdir / "a.jsonl", "first", 3)), "-o", str(out),
                 "--job-id", job_id, "--max-new-tokens", "2", "--quiet")
    assert first.returncode == 0, first.stderr
    before, other = farm_state(url), workdir / "other.jsonl"
    run = farm(url, "submit", str(prompt_file(workdir / "b.jsonl", "second", 3)), "-o", str(other),
               "--job-id", job_id, "--max-new-tokens", "2")
    assert run.returncode == 2
    assert one_line(run.stderr) == (f"farm submit: job_id: job {job_id} was submitted with other prompts; "
                                    "use another job id")
    assert not other.exists() and farm_state(url) == before
