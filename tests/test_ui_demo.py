"""The UI on the real demo model (SmolLM2-135M-Instruct), in a real Chromium, as a newcomer meets it
after ``./farm up``: a chat question answered, the Farm tab's chart with its points drawn, and the
Bulk tab listing a batch made through the HTTP Batch API. Screenshots: test-output/ui/demo-*.png."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producer import FarmClient
from tests.api_server import sdk_client, start_api
from tests.conftest import OUTPUT, WorkerProcess, wait_until
from tests.demo import module_demo_worker
from tests.ui_browser import CLOCK, ask_in_page, browser_page, read_chart
from tests.ui_server import UiApp, launch_ui, running_uis

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France?"
SHOTS = OUTPUT / "ui"

demo_worker = module_demo_worker("ui-demo", name="demo-ui@test")


@pytest.fixture(scope="module")
def demo_ui(demo_worker: WorkerProcess) -> Iterator[UiApp]:
    with running_uis({"demo": launch_ui("demo", demo_worker.redis_url)}) as apps:
        yield apps["demo"]


def batch_input() -> bytes:
    questions = [QUESTION, "Name a primary color."]
    return "".join(json.dumps({"custom_id": f"demo-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "demo", "max_tokens": 40,
                                        "messages": [{"role": "user", "content": q}]}}) + "\n"
                   for i, q in enumerate(questions)).encode()


def test_browser_chat_farm_and_bulk_on_the_demo_model(demo_ui: UiApp, demo_worker: WorkerProcess,
                                                      tmp_path: Path) -> None:
    """The chat answers "What is the capital of France?" with Paris (the demo model preselected,
    the only one); the Farm tab draws a point per batch on a clock axis; the Bulk tab lists the
    batch, made first through the real SDK and ``farm api``, as completed with its output file."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    server = start_api(demo_worker.redis_url, tmp_path / "api")
    try:
        oai = sdk_client(server)
        source = oai.files.create(file=("demo.jsonl", batch_input()), purpose="batch")
        batch = oai.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
        with browser_page(demo_ui.url) as page:
            page.wait_for_function("() => document.querySelector('#chat-model input').value === 'demo'",
                                   timeout=30000)
            _, request_id = ask_in_page(page, QUESTION)
            answer = page.locator("#chatbot .message-row.bot-row").last.inner_text()
            page.screenshot(path=str(SHOTS / "demo-chat.png"), full_page=True)
            page.get_by_role("tab", name="Farm").click()
            wait_until(lambda: drawn_points(page, "Recent batch sizes") > 0, 30, "no batch drawn on the chart")
            page.wait_for_timeout(500)  # for the screenshot only: the line chart draws beside it
            sizes = read_chart(page, "Recent batch sizes")
            page.screenshot(path=str(SHOTS / "demo-farm.png"), full_page=True)
            wait_until(lambda: oai.batches.retrieve(batch.id).status == "completed", 120, "the batch did not complete")
            page.get_by_role("tab", name="Bulk").click()
            page.locator("#api-batches").get_by_text(batch.id).filter(visible=True).first.wait_for(timeout=30000)
            listed = page.locator("#api-batches").inner_text()
            page.screenshot(path=str(SHOTS / "demo-bulk.png"), full_page=True)
        done = oai.batches.retrieve(batch.id)
        outputs = [json.loads(line) for line in oai.files.content(done.output_file_id or "").text.splitlines()]
    finally:
        server.close()
    stored = FarmClient(demo_worker.redis_url).handle(request_id).result(timeout=30)
    assert "Paris" in answer, answer
    assert answer.strip() == stored.text.strip() and stored.model == "demo" and stored.finish_reason == "stop"
    assert sizes is not None and sizes.points and all(CLOCK.match(label) for label in sizes.x_labels), sizes
    assert batch.id in listed and "completed" in listed and str(done.output_file_id) in listed
    france = next(o for o in outputs if o["custom_id"] == "demo-0")
    assert "Paris" in france["response"]["body"]["choices"][0]["message"]["content"]



def drawn_points(page: Any, title: str) -> int:
    chart = read_chart(page, title)
    return len(chart.points) if chart is not None else 0
