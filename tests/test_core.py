"""The farm's core against a real redis-server and a real worker process with the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer import FarmClient
from protocol.errors import RequestError
from protocol.names import GENERATE_TASK, INTERACTIVE_QUEUE
from tests.conftest import wait_until
from tests.helpers import PROMPTS, reference_text, submit_all

pytestmark = pytest.mark.integration

def test_32_concurrent_requests_succeed_in_batches(client: FarmClient) -> None:
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    results = submit_all(client, prompts, max_new_tokens=12)
    assert all(r.ok and r.finish_reason == "length" for r in results), results
    assert all(r.completion_tokens == 12 and r.text for r in results)
    assert max(r.batch_size for r in results) > 1
    assert {r.worker for r in results} == {"cpu@test"}
    assert len({r.id for r in results}) == 32


def test_greedy_outputs_are_batch_invariant(client: FarmClient, tiny_model: Path) -> None:
    mixed = PROMPTS * 2  # neighbours of different lengths, several batches
    results = submit_all(client, mixed, max_new_tokens=20, adapter="base")
    assert max(r.batch_size for r in results) > 1
    for prompt, result in zip(mixed, results, strict=True):
        assert result.text == reference_text(tiny_model, prompt, 20), prompt


def test_lora_adapter_changes_outputs(client: FarmClient, tiny_model: Path) -> None:
    base = submit_all(client, PROMPTS, max_new_tokens=16, adapter="base")
    default = submit_all(client, PROMPTS, max_new_tokens=16)  # FARM_ADAPTER is the default
    second = submit_all(client, PROMPTS, max_new_tokens=16, adapter="second")
    assert {r.adapter for r in default} == {"default"}
    assert sum(a.text != b.text for a, b in zip(base, default, strict=True)) >= len(PROMPTS) // 2
    assert [r.text for r in second] != [r.text for r in default]
    assert default[0].text == reference_text(tiny_model, PROMPTS[0], 16, tiny_model / "adapter")


def test_stream_deltas_concatenate_to_final_text(client: FarmClient) -> None:
    handle = client.submit("Streaming is", max_new_tokens=40)
    deltas = list(handle.stream(timeout=60))
    result = handle.result(timeout=30)
    assert len(deltas) > 1
    assert "".join(deltas) == result.text
    assert result.first_token_seconds is not None


def test_stop_string_ends_request_and_stream_agrees(client: FarmClient) -> None:
    free = client.generate("The list type", max_new_tokens=30, adapter="base", timeout=60)
    stop = free.text[5:7]
    handle = client.submit("The list type", max_new_tokens=30, adapter="base", stop=[stop])
    deltas = list(handle.stream(timeout=60))
    result = handle.result(timeout=30)
    assert result.finish_reason == "stop"
    assert result.text == free.text[: free.text.index(stop)]
    assert "".join(deltas) == result.text


def test_sampling_with_seed_is_reproducible(client: FarmClient) -> None:
    params = {"max_new_tokens": 16, "temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 7}
    first, second = (client.generate("Sampling", timeout=60, **params) for _ in range(2))
    assert first.text == second.text
    other = client.generate("Sampling", timeout=60, **{**params, "seed": 8})
    assert other.text != first.text


@pytest.mark.parametrize(("params", "message"), [
    ({"prompt": ""}, "prompt: is empty"),
    ({"prompt": "x" * 16001}, "prompt: is 16001 characters, over the limit of 16000"),
    ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens: must be between 1 and 1024, got 0"),
    ({"prompt": "x", "max_new_tokens": 1025}, "max_new_tokens: must be between 1 and 1024, got 1025"),
    ({"prompt": "x", "temperature": "hot"}, "temperature: must be a number, got str"),
    ({"prompt": "x", "beams": 4}, "beams: unknown parameter"),
    ({"prompt": 42}, "prompt: must be a string, got int"),
    ({"prompt": "x", "adapter": "nope"}, "adapter: unknown adapter 'nope'"),
])
def test_bad_requests_are_refused_before_enqueueing(client: FarmClient, params: dict[str, object],
                                                     message: str) -> None:
    before = client.queue_depths()
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        client.submit(**params)  # type: ignore[arg-type]
    assert client.queue_depths() == before


def test_crafted_bad_messages_fail_alone(client: FarmClient) -> None:
    good = [client.submit(p, max_new_tokens=8) for p in PROMPTS[:4]]
    bad = {
        "crafted-empty": {"request": {"prompt": "", "max_new_tokens": 4}},
        "crafted-type": {"request": "not an object"},
        "crafted-limit": {"request": {"prompt": "x", "max_new_tokens": 10**6}},
        "crafted-adapter": {"request": {"prompt": "x", "adapter": "nope"}},
        "crafted-args": {"unexpected": 1},
    }
    for task_id, kwargs in bad.items():
        client.app.send_task(GENERATE_TASK, kwargs=kwargs, task_id=task_id, queue=INTERACTIVE_QUEUE)
    good += [client.submit(p, max_new_tokens=8) for p in PROMPTS[4:]]
    assert all(h.result(timeout=60).ok for h in good)
    errors = {task_id: client.handle(task_id).result(timeout=30).error for task_id in bad}
    assert errors["crafted-empty"] == {"code": "invalid_request", "message": "prompt: is empty"}
    assert errors["crafted-type"]["message"] == "request: must be an object, got str"
    assert "max_new_tokens: must be between 1 and 1024" in errors["crafted-limit"]["message"]
    assert errors["crafted-adapter"]["code"] == "unknown_adapter"
    assert errors["crafted-args"]["code"] == "internal"
    assert client.generate("still serving", max_new_tokens=4, timeout=60).ok


def test_poisoned_request_fails_alone_in_its_batch(client: FarmClient) -> None:
    prompts = [f"{p} <<poison>>" if i == 3 else p for i, p in enumerate(PROMPTS)]
    results = submit_all(client, prompts, max_new_tokens=8)
    assert results[3].finish_reason == "error"
    assert results[3].error and "poisoned" in results[3].error["message"]
    assert all(r.ok for i, r in enumerate(results) if i != 3)


def test_cancel_running_request(client: FarmClient) -> None:
    handle = client.submit("A long story", max_new_tokens=1024, ignore_eos=True)
    events = handle.events(timeout=60)
    assert next(e for e in events if e["type"] == "delta")
    handle.cancel()
    result = handle.result(timeout=30)
    assert result.finish_reason == "cancelled"
    assert 0 < result.completion_tokens < 1024
    assert handle.status().state == "cancelled"


def test_status_right_after_the_stream_ends_agrees_with_it(client: FarmClient) -> None:
    for i in range(8):  # the worker ends the stream a moment before Celery stores the result
        handle = client.submit(f"status after stream {i}", max_new_tokens=6)
        text = "".join(handle.stream(timeout=60))
        status = handle.status()
        assert (status.state, status.finish_reason, status.worker) == ("done", "length", "cpu@test"), status
        assert status.text == text == handle.result(timeout=30).text


def test_status_reports_done_with_worker_and_batch(client: FarmClient) -> None:
    handle = client.submit("status", max_new_tokens=4)
    handle.result(timeout=60)
    status = handle.status()
    assert (status.state, status.worker) == ("done", "cpu@test")
    assert status.batch_size and status.batch_size >= 1
    assert client.handle("never-submitted").status().state == "unknown"


def test_redelivered_finished_message_does_not_run_again(client: FarmClient, farm_worker) -> None:  # type: ignore[no-untyped-def]
    handle = client.submit("once only", max_new_tokens=4, request_id="idempotent-1")
    first = handle.result(timeout=60)
    client.app.send_task(GENERATE_TASK, kwargs={"request": {"prompt": "once only", "max_new_tokens": 4}},
                         task_id="idempotent-1", queue=INTERACTIVE_QUEUE)
    assert client.generate("after", max_new_tokens=2, timeout=60).ok
    wait_until(lambda: client.redis.llen(INTERACTIVE_QUEUE) == 0 and client.redis.hlen("unacked") == 0,
               30, "the duplicate message was not consumed")
    assert client.handle("idempotent-1").result(timeout=30).text == first.text
    assert int(client.redis.hget("farm:executions", "idempotent-1") or 0) == 1


def test_heartbeat_reports_model_and_batches(client: FarmClient) -> None:
    client.generate("beat", max_new_tokens=2, timeout=60)
    # the heartbeat is written every FARM_HEARTBEAT_SECONDS: the batch shows at the next beat
    wait_until(lambda: client.workers()[0]["batches"] >= 1, 30, "the heartbeat never counted the batch")
    (worker,) = client.workers()
    assert worker["ready"] is True and worker["device"] == "cpu"
    assert worker["adapters"] == ["base", "default", "second"]
