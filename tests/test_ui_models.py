"""The UI and the farm's models and batches: the model picker (``FarmClient.models()``), the chosen
``model`` on every request and job row, the full-queue check on that model's queue, and the Bulk
tab's list of the batches made through the HTTP Batch API. ``python -m ui.app`` subprocesses on the
shared tiny-model worker's Redis and on a db where two models' heartbeats are written by hand."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from protocol.names import INTERACTIVE_QUEUE, heartbeat_key
from tests.api_server import sdk_client, start_api
from tests.conftest import OUTPUT, RedisServer, WorkerProcess, wait_until
from tests.ui_browser import browser_page
from tests.ui_server import UiApp, generate, launch_ui, running_uis

pytestmark = pytest.mark.integration

MODELS_DB = "ui-models"  # two models' heartbeats written by hand, nobody consuming their queues


@pytest.fixture(scope="module")
def apps(redis_server: RedisServer, farm_worker: WorkerProcess) -> Iterator[dict[str, UiApp]]:
    """Two UIs: on the shared worker's Redis, and on this module's db (queue limit 3)."""
    redis_server.client(MODELS_DB).flushdb()
    started = {"farm": launch_ui("models-farm", farm_worker.redis_url),
               "models": launch_ui("models", redis_server.url(MODELS_DB), ui_max_queue="3")}
    try:
        with running_uis(started) as running:
            yield running
    finally:
        redis_server.client(MODELS_DB).flushdb()


def test_bulk_tab_lists_batches_made_through_the_api(apps: dict[str, UiApp], farm_worker: WorkerProcess,
                                                     tmp_path: Path) -> None:
    """A batch made with the real SDK against a real ``farm api`` (stopped before the UI reads),
    and an invalid one: the Bulk tab lists both from Redis, as ``GET /v1/batches`` has them."""
    chat = [{"custom_id": f"ui-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "tiny", "messages": [{"role": "user", "content": f"Question {i}"}], "max_tokens": 4}}
            for i in range(3)]
    server = start_api(farm_worker.redis_url, tmp_path / "api")
    try:
        oai = sdk_client(server)
        good = oai.files.create(file=("ui.jsonl", jsonl(chat)), purpose="batch")
        bad = oai.files.create(file=("dup.jsonl", jsonl([chat[0], chat[0]])), purpose="batch")
        batch = oai.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h")
        failed = oai.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")
        wait_until(lambda: oai.batches.retrieve(batch.id).status == "completed", 120, "the batch did not complete")
        done = oai.batches.retrieve(batch.id)
    finally:
        server.close()
    note, table = apps["farm"].client().predict(api_name="/batches")
    rows = {row[0]: row for row in table["data"]}
    assert table["headers"] == ["batch", "status", "requests", "created", "output file", "error file"]
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(done.created_at))
    assert rows[batch.id] == [batch.id, "completed", "3/3 completed, 0 failed", created, done.output_file_id, ""]
    assert done.output_file_id and rows[failed.id][1:3] == ["failed", "0/0 completed, 0 failed"]
    assert [row[3] for row in table["data"]] == sorted((row[3] for row in table["data"]), reverse=True)  # newest first
    assert note.startswith("Batches made through the HTTP Batch API")
    with browser_page(apps["farm"].url) as page:
        page.get_by_role("tab", name="Bulk").click()
        page.locator("#api-batches").get_by_text(batch.id).filter(visible=True).first.wait_for(timeout=30000)
        shown = page.locator("#api-batches").inner_text()
        page.screenshot(path=str(OUTPUT / "ui" / "bulk-batches.png"), full_page=True)
    assert done.output_file_id in shown and failed.id in shown


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def model_worker(db: redis.Redis, model: str, adapters: list[str]) -> None:
    """A heartbeat of a worker serving ``model`` alone (its own queues, not the plain ones), with
    nobody behind it: what the UI reads is all there is."""
    record = {"name": f"{model}@test", "ready": True, "state": "ready", "model_name": model, "adapters": adapters,
              "queues": [f"interactive.{model}", f"bulk.{model}"], "updated_at": time.time()}
    db.set(heartbeat_key(f"{model}@test"), json.dumps(record), ex=120)


@pytest.fixture()
def two_models(redis_server: RedisServer) -> Iterator[redis.Redis]:
    db = redis_server.client(MODELS_DB)
    model_worker(db, "alpha", ["base"])
    model_worker(db, "beta", ["base", "pirate"])
    yield db
    db.flushdb()


def queued_requests(db: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The requests of the Celery messages waiting in ``queue``."""
    bodies = [json.loads(base64.b64decode(json.loads(raw)["body"])) for raw in db.lrange(queue, 0, -1)]
    return [body[1]["request"] for body in bodies]


def test_requests_carry_the_chosen_model_and_wait_on_its_queue(apps: dict[str, UiApp], two_models: redis.Redis) -> None:
    """Two models served: none chosen is refused with the list; the chosen one goes to its own
    queue; the full-queue check reads that queue (FARM_UI_MAX_QUEUE=3), not the plain one."""
    ui, db = apps["models"], two_models
    status, _, _ = generate(ui, "hello").result(timeout=30)  # type: ignore[attr-defined]
    assert status.startswith("**Not sent.** Invalid request: model: several models are served (alpha, beta): name one")
    db.lpush("interactive.beta", "a", "b", "c")
    db.lpush(INTERACTIVE_QUEUE, "x", "y", "z")  # no worker of alpha or beta takes the plain queue
    status, _, request_id = generate(ui, "hello", model_name="beta").result(timeout=30)  # type: ignore[attr-defined]
    assert status.startswith("**Not sent.** The farm's queue is full (3 requests waiting, limit 3")
    assert request_id == "" and db.llen("interactive.beta") == 3
    job = generate(ui, "hello alpha", model_name="alpha", new_tokens=5)
    wait_until(lambda: job.outputs(), 30, "no status")  # type: ignore[attr-defined]
    status, _, request_id = job.outputs()[0]  # type: ignore[attr-defined]
    assert status == "**Queued**: 0 requests ahead in the farm's queue."
    (sent,) = queued_requests(db, "interactive.alpha")
    assert (sent["prompt"], sent["model"], sent["max_new_tokens"]) == ("hello alpha", "alpha", 5)
    ui.client().predict(request_id, api_name="/cancel")


def test_bulk_job_rows_carry_the_chosen_model(apps: dict[str, UiApp], two_models: redis.Redis,
                                              tmp_path: Path) -> None:
    """A job started in the Bulk tab with a model: its rows wait in that model's bulk queue."""
    from gradio_client import handle_file

    prompts = tmp_path / "rows.txt"
    prompts.write_text("first row\nsecond row\n")
    ui = apps["models"].client()
    job_id, _ = ui.predict(handle_file(str(prompts)), "prompt", "ui-model-job", 8, 0.0, 1.0, "(farm default)",
                           "beta", api_name="/start_job")
    assert job_id == "ui-model-job"
    wait_until(lambda: two_models.llen("bulk.beta") == 2, 30, "the rows are not in beta's bulk queue")
    sent = queued_requests(two_models, "bulk.beta")
    assert sorted((r["prompt"], r["model"]) for r in sent) == [("first row", "beta"), ("second row", "beta")]
    assert two_models.llen("bulk.alpha") == two_models.llen("bulk") == 0
    assert "cancelled" in ui.predict(job_id, api_name="/cancel_job")


def test_browser_model_picker_lists_the_served_models(apps: dict[str, UiApp], two_models: redis.Redis) -> None:
    """The chat's and the Bulk tab's pickers list both models, none chosen; the chosen model's
    adapters are offered and the message goes to its queue; a model gone is gone from the list
    when it is opened again, and the one left is chosen."""
    db = two_models
    with browser_page(apps["models"].url) as page:
        assert page.locator("#chat-model input").input_value() == ""
        dropdown_options(page, "#chat-model", ["alpha", "beta"], choose="beta")
        page.locator("#chat-adapter").wait_for(timeout=15000)  # beta has adapters to choose from
        dropdown_options(page, "#chat-adapter", ["(farm default)", "base", "pirate"])
        page.locator("#chat-message textarea").fill("Ahoy?")
        page.locator("#chat-message textarea").press("Enter")
        page.get_by_text("Queued").first.wait_for(timeout=30000)
        page.screenshot(path=str(OUTPUT / "ui" / "model-picker.png"), full_page=True)
        request_id = page.locator("#chat-request-id textarea, #chat-request-id input").first.input_value()
        page.locator("#chat-cancel").click()
        page.get_by_text("Cancelled").first.wait_for(timeout=30000)
        page.get_by_role("tab", name="Bulk").click()
        dropdown_options(page, "#bulk-model", ["alpha", "beta"])
        db.delete(heartbeat_key("beta@test"))
        page.get_by_role("tab", name="Generate").click()
        dropdown_options(page, "#chat-model", ["alpha"])
        page.locator("#chat-message textarea").click()  # the dropdown shows its new value once left
        page.wait_for_function("() => document.querySelector('#chat-model input').value === 'alpha'", timeout=15000)
    sent = queued_requests(db, "interactive.beta")
    assert [r["model"] for r in sent] == ["beta"] and sent[0]["messages"] == [{"role": "user", "content": "Ahoy?"}]
    assert db.get(f"farm:cancel:{request_id}") == b"1"


def dropdown_options(page: Any, selector: str, expected: list[str], choose: str | None = None) -> None:
    """Open the dropdown at ``selector``, see it list ``expected`` (it is read again from the farm
    when opened: the list may change once open), then choose ``choose`` or close it; returns once
    the list is closed (Gradio draws it outside the dropdown, one at a time)."""
    page.locator(f"{selector} input").click()
    seen: list[list[str]] = []
    read = "() => [...document.querySelectorAll('[role=option]')].map(o => o.innerText.replace('✓', '').trim())"
    try:
        wait_until(lambda: seen.append(page.evaluate(read)) or seen[-1] == expected, 15, "other options")
    except AssertionError:
        raise AssertionError(f"{selector} lists {seen[-1]}, not {expected}") from None
    if choose is None:
        page.keyboard.press("Escape")
    else:
        page.get_by_role("option").filter(has_text=choose).first.click()
    page.wait_for_function("() => !document.querySelector('[role=option]')", timeout=15000)
