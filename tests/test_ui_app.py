"""The Gradio UI as users meet it: ``python -m ui.app`` subprocesses driven by ``gradio_client``
and by a real Chromium (Playwright), against the test Redis and the shared tiny-model worker."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from gradio_client import Client

from producer import FarmClient
from protocol.names import INTERACTIVE_QUEUE, heartbeat_key, stream_key
from protocol.schema import Limits
from tests.conftest import OUTPUT, RedisServer, WorkerProcess, free_port, wait_until
from tests.ui_browser import CLOCK, ask_in_page, browser_page, read_chart, set_max_new_tokens
from tests.ui_server import DEFAULTS, FLOWER_PORT, UiApp, generate, launch_ui, running_uis

pytestmark = pytest.mark.integration

IDLE_DB = "ui-idle"  # a db no worker serves; this module's own
CHART_DB = "ui-charts"  # the charts' test: heartbeats written by hand
AUTH = ("tester", "s3cret")
CHAT_DEFAULTS = {"system": "", "new_tokens": 24, "temp": 0.0, "p": 1.0, "adapter_name": "(farm default)",
                 "seed_value": -1, "model_name": None}


@pytest.fixture(scope="module")
def apps(redis_server: RedisServer, farm_worker: WorkerProcess) -> Iterator[dict[str, UiApp]]:
    """Four UIs started together (importing gradio takes seconds): on the worker's Redis, on a
    db no worker serves (with a login and a queue limit of 3), on a closed port, and on a db
    whose heartbeats the charts' test writes."""
    own = (IDLE_DB, CHART_DB)
    for db in own:
        redis_server.client(db).flushdb()
    started = {
        "farm": launch_ui("farm", farm_worker.redis_url),
        "idle": launch_ui("idle", redis_server.url(IDLE_DB), ui_auth=":".join(AUTH), ui_max_queue="3"),
        "down": launch_ui("down", f"redis://127.0.0.1:{free_port()}/0"),
        "charts": launch_ui("charts", redis_server.url(CHART_DB)),
    }
    try:
        with running_uis(started) as running:
            yield running
    finally:
        for db in own:
            redis_server.client(db).flushdb()


def test_generate_streams_partial_text_then_the_stored_result(apps: dict[str, UiApp]) -> None:
    job = generate(apps["farm"], "Streaming through the UI", new_tokens=400)
    status, text, request_id = job.result(timeout=120)  # type: ignore[attr-defined]
    updates = job.outputs()  # type: ignore[attr-defined]
    stored = FarmClient(apps["farm"].redis_url).handle(request_id).result(timeout=30)
    assert stored.ok and stored.completion_tokens == 400
    assert text == stored.text
    partials = [u[1] for u in updates[:-1] if u[1]]
    assert len(set(partials)) >= 3, updates  # the text grew in several steps before the end
    assert all(stored.text.startswith(p) for p in partials)
    assert any("Running** on `cpu@test` in a batch of" in u[0] for u in updates)
    assert status.startswith("**Done**: 400 tokens in ") and "tokens/s on `cpu@test`" in status


def test_cancel_stops_a_running_request(apps: dict[str, UiApp]) -> None:
    job = generate(apps["farm"], "A long story", new_tokens=1024)
    wait_until(lambda: any(u[1] for u in job.outputs()), 60, "no partial text")  # type: ignore[attr-defined]
    request_id = job.outputs()[-1][2]  # type: ignore[attr-defined]
    status, text, _ = apps["farm"].client().predict(request_id, api_name="/cancel")
    stored = FarmClient(apps["farm"].redis_url).handle(request_id).result(timeout=30)
    assert stored.finish_reason == "cancelled" and 0 < stored.completion_tokens < 1024
    assert status == f"**Cancelled** after {stored.completion_tokens} tokens."
    assert text == stored.text


def test_closing_the_stream_cancels_the_request(apps: dict[str, UiApp]) -> None:
    """A person who leaves (the Gradio event is cancelled) does not keep a batch slot."""
    job = generate(apps["farm"], "Nobody is reading this", new_tokens=1024)
    wait_until(lambda: any(u[1] for u in job.outputs()), 60, "no partial text")  # type: ignore[attr-defined]
    request_id = job.outputs()[-1][2]  # type: ignore[attr-defined]
    job.cancel()  # type: ignore[attr-defined]
    stored = FarmClient(apps["farm"].redis_url).handle(request_id).result(timeout=60)
    assert stored.finish_reason == "cancelled" and stored.completion_tokens < 1024


@pytest.mark.parametrize(("app", "prompt", "message"), [
    ("farm", "", "The prompt is empty: type a prompt, then press Enter or Submit."),
    ("farm", "x" * 16001, "The prompt is too long: prompt: is 16001 characters, over the limit of 16000."),
    ("idle", "hello", "No worker is online, so nothing would run this request. Start one with `./farm worker`"),
    ("down", "hello", "The farm is unreachable: Redis at redis://127.0.0.1:"),
])
def test_refusals_say_why(apps: dict[str, UiApp], app: str, prompt: str, message: str) -> None:
    status, text, request_id = generate(apps[app], prompt).result(timeout=60)  # type: ignore[attr-defined]
    assert status.startswith(f"**Not sent.** {message}") and (text, request_id) == ("", "")


def test_unreachable_redis_names_the_remedy(apps: dict[str, UiApp]) -> None:
    status, _, _ = generate(apps["down"], "hello").result(timeout=60)  # type: ignore[attr-defined]
    assert re.search(r"is unreachable \(.*Connection refused.*\); start the farm with `./farm up`", status)


def fake_worker(db: redis.Redis) -> None:
    """A heartbeat with nobody behind it: the UI believes a worker is online."""
    record = {"name": "ghost@test", "ready": True, "adapters": ["base"], "waiting": 0, "updated_at": time.time()}
    db.set(heartbeat_key("ghost@test"), json.dumps(record), ex=60)


def test_full_queue_is_refused(apps: dict[str, UiApp], redis_server: RedisServer) -> None:
    db = redis_server.client(IDLE_DB)
    fake_worker(db)
    db.lpush(INTERACTIVE_QUEUE, "a", "b", "c")  # FARM_UI_MAX_QUEUE=3 waiting, nobody consuming
    try:
        status, _, request_id = generate(apps["idle"], "hello").result(timeout=30)  # type: ignore[attr-defined]
        assert status.startswith("**Not sent.** The farm's queue is full (3 requests waiting, limit 3")
        assert request_id == ""
        assert db.llen(INTERACTIVE_QUEUE) == 3
    finally:
        db.flushdb()


def test_queued_request_shows_depth_and_cancels(apps: dict[str, UiApp], redis_server: RedisServer) -> None:
    db = redis_server.client(IDLE_DB)
    fake_worker(db)
    db.lpush(INTERACTIVE_QUEUE, "someone-else")
    try:
        job = generate(apps["idle"], "waiting in line")
        wait_until(lambda: job.outputs(), 30, "no status")  # type: ignore[attr-defined]
        status, _, request_id = job.outputs()[0]  # type: ignore[attr-defined]
        assert status == "**Queued**: 1 request ahead in the farm's queue."
        status, _, _ = apps["idle"].client().predict(request_id, api_name="/cancel")
        assert status == "**Cancelled** before it started: it will not run."
        assert db.get(f"farm:cancel:{request_id}") == b"1"
    finally:
        db.flushdb()


def test_running_status_then_a_lost_worker(apps: dict[str, UiApp], redis_server: RedisServer) -> None:
    """The worker's side played by hand: its stream events and its heartbeat."""
    db = redis_server.client(IDLE_DB)
    fake_worker(db)
    try:
        job = generate(apps["idle"], "a run nobody finishes")
        wait_until(lambda: job.outputs(), 30, "no status")  # type: ignore[attr-defined]
        request_id = job.outputs()[0][2]  # type: ignore[attr-defined]
        for event in ({"type": "start", "worker": "ghost@test", "batch_size": 3}, {"type": "delta", "text": "Hel"},
                      {"type": "delta", "text": "lo"}):
            db.xadd(stream_key(request_id), {"event": json.dumps(event)})
        running = ("**Running** on `ghost@test` in a batch of 3…", "Hello", request_id)
        wait_until(lambda: tuple(job.outputs()[-1]) == running, 30, "no running status")  # type: ignore[attr-defined]
        db.delete(heartbeat_key("ghost@test"))
        wait_until(lambda: job.outputs()[-1][0].startswith(  # type: ignore[attr-defined]
            "**Waiting**: worker `ghost@test` stopped while running this request."), 30, "no lost-worker status")
        job.cancel()  # type: ignore[attr-defined]
        wait_until(lambda: db.get(f"farm:cancel:{request_id}") == b"1", 30, "leaving did not cancel")
    finally:
        db.flushdb()


def test_login_is_required_when_configured(apps: dict[str, UiApp]) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(apps["idle"].url + "/config", timeout=5)
    assert refused.value.code == 401
    assert apps["idle"].client().view_api(print_info=False, return_format="dict")


def test_farm_tab_shows_workers_batches_and_flower(apps: dict[str, UiApp]) -> None:
    generate(apps["farm"], "for the chart", new_tokens=8).result(timeout=60)  # type: ignore[attr-defined]
    ui = apps["farm"].client()
    views: list[tuple[str, dict, dict, dict]] = []  # type: ignore[type-arg]
    # The batch shows once the worker's next heartbeat (every 0.5 s here) carries it.
    wait_until(lambda: views.append(ui.predict(api_name="/farm")) or views[-1][2]["data"], 30, "no batch shown")
    summary, workers, sizes, _speed = views[-1]
    assert "**1 worker online**" in summary
    assert f"(http://127.0.0.1:{FLOWER_PORT}/)" in summary
    assert [row[0] for row in workers["data"]] == ["cpu@test"]
    assert sizes["data"] and sizes["columns"] == ["time", "worker", "batch size", "tokens/s"]


def test_sixteen_clients_at_once_are_batched(apps: dict[str, UiApp]) -> None:
    clients = [apps["farm"].client() for _ in range(16)]
    with ThreadPoolExecutor(16) as pool:
        jobs = list(pool.map(lambda ic: ic[1].submit(f"Client {ic[0]} says", *{**DEFAULTS, "new_tokens": 24}.values(),
                                                     api_name="/generate"), enumerate(clients)))
        outputs = [job.result(timeout=120) for job in jobs]
    farm = FarmClient(apps["farm"].redis_url)
    results = [farm.handle(request_id).result(timeout=30) for _, _, request_id in outputs]
    assert all(r.ok and r.completion_tokens == 24 for r in results)
    assert [text for _, text, _ in outputs] == [r.text for r in results]
    assert all(status.startswith("**Done**: 24 tokens") for status, _, _ in outputs)
    sizes = [r.batch_size for r in results]
    print(f"\n16 UI clients: batch sizes {sorted(sizes)}")
    assert max(sizes) > 1


def test_browser_streams_text_and_shows_the_result(apps: dict[str, UiApp]) -> None:
    shots = OUTPUT / "ui"
    with browser_page(apps["farm"].url) as page:
        page.get_by_role("tab", name="Completion").click()
        page.locator("#prompt textarea").press("Enter")  # Enter submits; an empty prompt is refused
        page.get_by_text("Not sent. The prompt is empty").wait_for(timeout=15000)
        page.screenshot(path=str(shots / "refused.png"), full_page=True)
        page.get_by_text("Parameters").click()
        page.locator("#max-new-tokens input[type=number]").fill("1000")
        page.locator("#max-new-tokens input[type=number]").press("Enter")
        page.locator("#max-new-tokens input[type=number]").press("Tab")
        # What the page will send: under load Gradio may not have taken the typed value yet.
        asked = int(page.locator("#max-new-tokens input[type=range]").input_value())
        page.locator("#prompt textarea").fill("Once upon a time")
        page.evaluate(RECORD_OUTPUT)
        page.locator("#submit").click()
        seen = watch_output(page)
        page.screenshot(path=str(shots / "generate.png"), full_page=True)
        request_id = page.locator("#request-id input, #request-id textarea").first.input_value()
        page.get_by_role("tab", name="Farm").click()
        page.get_by_text(re.compile(r"[1-9][0-9.]* tokens/s over the last minute")).wait_for(timeout=15000)
        page.wait_for_timeout(1500)  # the charts draw after their data arrives; for the screenshot only
        page.screenshot(path=str(shots / "farm.png"), full_page=True)
        run_bulk_job_in_page(page, shots)
    stored = FarmClient(apps["farm"].redis_url).handle(request_id).result(timeout=30)
    assert stored.completion_tokens == asked > 1
    assert seen[-1] == stored.text
    growing = [text for text in seen[:-1] if text]
    assert len(growing) >= 3, [len(t) for t in seen]  # partial text grew in the page before the final text
    assert all(stored.text.startswith(text) for text in growing)


def run_bulk_job_in_page(page: Any, shots: Path) -> None:
    """Upload a text file of prompts, start the job, see it finish with a results file."""
    prompts = shots / "browser-prompts.txt"
    prompts.write_text("".join(f"Bulk prompt {i}\n" for i in range(5)))
    page.get_by_role("tab", name="Bulk").click()
    page.locator("#bulk-file input[type=file]").set_input_files(str(prompts))
    # The file list shows the name as two spans (stem, extension) and labels the cell with it whole.
    page.locator("#bulk-file").get_by_label("browser-prompts.txt").first.wait_for(timeout=30000)
    page.locator("#start-job").click()
    page.get_by_text("finished, 5/5 rows (5 done").wait_for(timeout=60000)
    page.locator("#job-results").get_by_text(".jsonl").first.wait_for(timeout=15000)
    page.screenshot(path=str(shots / "bulk.png"), full_page=True)


RECORD_OUTPUT = """() => {
    // Sample the output box inside the page: a round trip per sample from Python could miss a
    // fast generation altogether on a busy machine.
    window.seenOutputs = [];
    const box = document.querySelector('#output textarea');
    window.outputSampler = setInterval(() => {
        const seen = window.seenOutputs;
        if (seen.length === 0 || seen[seen.length - 1] !== box.value) seen.push(box.value);
    }, 5);
}"""


def watch_output(page: Any) -> list[str]:
    """Distinct contents of the output box until the status says Done (the last is final)."""
    page.get_by_text("Done:").wait_for(timeout=90000)
    time.sleep(0.1)
    return list(page.evaluate("() => { clearInterval(window.outputSampler); return window.seenOutputs; }"))


def bulk_client(app: UiApp, downloads: Path) -> Client:
    return Client(app.url, auth=app.auth, verbose=False, download_files=str(downloads))


def test_bulk_job_runs_an_upload_and_offers_results_in_order(apps: dict[str, UiApp], tmp_path: Path) -> None:
    from gradio_client import handle_file

    prompts = tmp_path / "prompts.jsonl"
    rows = ["The list type", {"prompt": "Hello", "max_new_tokens": 4}, "x = 1", "def f():", "Numbers", "Exceptions"]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ui = bulk_client(apps["farm"], tmp_path / "downloads")
    job_id, shown = ui.predict(handle_file(str(prompts)), "prompt", "", 12, 0.0, 1.0, "(farm default)",
                               api_name="/start_job")
    assert job_id.startswith("j") and "<progress" in shown
    final_id, shown, results_file = ui.predict(job_id, api_name="/follow_job")
    assert final_id == job_id and f"job {job_id}: finished, 6/6 rows (6 done" in shown
    lines = [json.loads(line) for line in Path(results_file).read_text().splitlines()]
    stored = list(FarmClient(apps["farm"].redis_url).job(job_id).results(timeout=30))
    assert [line["index"] for line in lines] == list(range(6))
    assert [line["text"] for line in lines] == [r.text for r in stored]
    assert [line["completion_tokens"] for line in lines] == [12, 4, 12, 12, 12, 12]


def test_bulk_tab_reattaches_to_a_job_by_id(apps: dict[str, UiApp], tmp_path: Path) -> None:
    farm = FarmClient(apps["farm"].redis_url)
    with farm.submit_job(["one", "two", "three"], "ui-attach-1", max_new_tokens=4) as job:
        job.wait(timeout=60)
    _, shown, results_file = bulk_client(apps["farm"], tmp_path).predict("ui-attach-1", api_name="/follow_job")
    assert "job ui-attach-1: finished, 3/3 rows (3 done" in shown
    assert len(Path(results_file).read_text().splitlines()) == 3
    _, shown, results_file = apps["farm"].client().predict("no-such-job", api_name="/follow_job")
    assert "no job &#x27;no-such-job&#x27; in Redis" in shown and results_file is None


def test_bulk_refuses_a_bad_file_naming_the_line(apps: dict[str, UiApp], tmp_path: Path) -> None:
    from gradio_client import handle_file

    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{"prompt": "x", "beams": 4}\n')
    job_id, shown = apps["farm"].client().predict(handle_file(str(bad)), "prompt", "", 8, 0.0, 1.0,
                                                  "(farm default)", api_name="/start_job")
    assert job_id == ""
    assert "The prompt file is invalid: bad.jsonl line 2: beams: unknown parameter" in shown


def test_bulk_job_can_be_cancelled(apps: dict[str, UiApp], tmp_path: Path) -> None:
    from gradio_client import handle_file

    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(40)))
    ui = bulk_client(apps["farm"], tmp_path / "downloads")
    job_id, _ = ui.predict(handle_file(str(prompts)), "prompt", "ui-cancel-1", 1000, 0.0, 1.0, "(farm default)",
                           api_name="/start_job")
    shown = ui.predict(job_id, api_name="/cancel_job")
    assert f"job {job_id}: cancelled" in shown
    _, shown, results_file = ui.predict(job_id, api_name="/follow_job")
    lines = [json.loads(line) for line in Path(results_file).read_text().splitlines()]
    assert len(lines) == 40 and sum(line["finish_reason"] == "cancelled" for line in lines) > 30


# (size, tokens/s) of four batches ten seconds apart: sizes out of order, rates of several digits.
CHART_BATCHES = [(1, 5.5), (3, 10.2), (7, 32.4), (5, 56.6)]


def test_farm_charts_draw_points_on_a_time_axis_and_numeric_axes(apps: dict[str, UiApp],
                                                                  redis_server: RedisServer) -> None:
    """The page opens before any batch ran, as after ``farm up``; the batches come later. Read
    back from the drawn SVG: a time axis (clock labels, not epoch milliseconds), numeric y axes
    ascending from 0, one point per batch left to right in time, and a line through them."""
    db = redis_server.client(CHART_DB)
    with browser_page(apps["charts"].url) as page:
        page.get_by_role("tab", name="Farm").click()
        page.get_by_text("No worker online").wait_for(timeout=30000)
        now = time.time()
        # Token counts are whole numbers in the heartbeat's schema: 10 s batches give the rates.
        batches = [{"at": now - 40 + 10 * i, "size": size, "tokens": round(rate * 10), "seconds": 10.0}
                   for i, (size, rate) in enumerate(CHART_BATCHES)]
        record = {"name": "charted@test", "ready": True, "adapters": ["base"], "updated_at": now,
                  "recent_batches": batches}
        db.set(heartbeat_key("charted@test"), json.dumps(record), ex=120)
        page.get_by_text("1 worker online").wait_for(timeout=30000)
        page.wait_for_timeout(2500)  # one more refresh: the charts redraw after their data
        sizes, speed = read_chart(page, "Recent batch sizes"), read_chart(page, "Throughput of recent batches")
        page.screenshot(path=str(OUTPUT / "ui" / "charts.png"), full_page=True)
        console = list(page.console)
    assert sizes is not None and speed is not None, "the charts are not drawn"
    for chart in (sizes, speed):
        assert chart.x_labels and all(CLOCK.match(label) for label in chart.x_labels), chart.x_labels
        assert chart.y_numbers() == sorted(chart.y_numbers()) and chart.y_numbers()[0] == 0, chart.y_labels
    # Vega picks the ticks (0, 20, 40 for 56.6 in a short chart): the values' range, not categories.
    assert max(sizes.y_numbers()) >= 7 / 2 and max(speed.y_numbers()) >= 56.6 / 2
    assert len(sizes.points) == 4, sizes.points
    xs, ys = [p[0] for p in sizes.points], [p[1] for p in sizes.points]
    by_time = [ys[i] for i in sorted(range(4), key=lambda i: xs[i])]
    assert sorted(range(4), key=lambda i: -by_time[i]) == [0, 1, 3, 2]  # sizes 1 < 3 < 5 < 7, bottom to top
    assert speed.line_vertices >= 4
    assert not [m for m in console if "domainMin" in m or "point scale" in m], console


def test_temperature_widgets_reach_the_api_limit(apps: dict[str, UiApp]) -> None:
    """The sliders end where the API does (Limits.max_temperature, 5), not at 2."""
    config = json.loads(urllib.request.urlopen(apps["farm"].url + "/config", timeout=10).read())
    ends = {c["props"].get("label"): c["props"].get("maximum") for c in config["components"]
            if str(c["props"].get("label", "")).startswith("Temperature")}
    assert ends == {"Temperature (0 = greedy)": Limits().max_temperature, "Temperature": 5.0}


def chat_prompt_tokens(tiny_model: Path, messages: list[dict[str, str]]) -> int:
    """Tokens of the prompt a worker renders from ``messages``: what its result's
    ``prompt_tokens`` counts, so the result tells which messages the request carried."""
    from types import SimpleNamespace

    from worker.model import load_tokenizer, render_prompt

    tokenizer = load_tokenizer(str(tiny_model))
    rendered = render_prompt(SimpleNamespace(tokenizer=tokenizer), "chat", None, tuple(messages))  # type: ignore[arg-type]
    return len(tokenizer(rendered)["input_ids"])


def chat_turn(app: UiApp, message: str, history: list[Any], **params: object) -> tuple[str, list[Any], str, str]:
    return app.client().predict(message, history, *{**CHAT_DEFAULTS, **params}.values(),  # type: ignore[no-any-return]
                                api_name="/chat")


def texts(history: list[Any]) -> list[tuple[str, str]]:
    return [(m["role"], "".join(part["text"] for part in m["content"])) for m in history]


def test_chat_sends_the_history_as_messages(apps: dict[str, UiApp], tiny_model: Path) -> None:
    """Two turns through ``/chat``: the second request carries question, answer, question."""
    farm = FarmClient(apps["farm"].redis_url)
    status, history, first_id, box = chat_turn(apps["farm"], "What is a list?", [])
    first = farm.handle(first_id).result(timeout=30)
    assert status.startswith("**Done**: 24 tokens") and box == ""
    assert texts(history) == [("user", "What is a list?"), ("assistant", first.text)]
    status, history, second_id, _ = chat_turn(apps["farm"], "And a tuple?", history, system="Be brief.")
    second = farm.handle(second_id).result(timeout=30)
    sent = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"},
            {"role": "assistant", "content": first.text}, {"role": "user", "content": "And a tuple?"}]
    assert second.prompt_tokens == chat_prompt_tokens(tiny_model, sent)
    assert texts(history) == [(m["role"], m["content"]) for m in sent[1:]] + [("assistant", second.text)]


def test_chat_refuses_an_empty_message_and_keeps_the_history(apps: dict[str, UiApp]) -> None:
    earlier = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]
    status, history, request_id, box = chat_turn(apps["farm"], "  ", earlier)
    assert status == "**Not sent.** The prompt is empty: type a prompt, then press Enter or Submit."
    assert texts(history) == [("user", "hi"), ("assistant", "hello")] and (request_id, box) == ("", "  ")


def test_browser_chat_streams_answers_and_sends_the_history(apps: dict[str, UiApp], tiny_model: Path) -> None:
    """A person types a question in the chat, sees the answer stream in, then asks again."""
    with browser_page(apps["farm"].url) as page:
        page.wait_for_function("() => document.querySelector('#chat-model input').value === 'tiny'", timeout=15000)
        set_max_new_tokens(page, 600)  # long enough to be seen growing on a busy machine
        seen, first_id = ask_in_page(page, "What is the capital of France?")
        set_max_new_tokens(page, 40)  # a short second answer keeps both turns in the screenshot
        _, second_id = ask_in_page(page, "And of Italy?")
        page.screenshot(path=str(OUTPUT / "ui" / "chat.png"), full_page=True)
        users = page.locator("#chatbot .message-row.user-row").all_inner_texts()
        bots = page.locator("#chatbot .message-row.bot-row").all_inner_texts()
        line = page.locator("#chat-status").inner_text()
    farm = FarmClient(apps["farm"].redis_url)
    first, second = farm.handle(first_id).result(timeout=30), farm.handle(second_id).result(timeout=30)
    assert [u.strip() for u in users] == ["What is the capital of France?", "And of Italy?"]
    assert len(bots) == 2 and first.ok and second.ok and first_id != second_id
    assert first.model == second.model == "tiny"  # the only model, preselected in the picker
    growing = [text for text in seen[:-1] if text]
    assert len(growing) >= 3, [len(t) for t in seen]  # the answer grew in the page before it ended
    assert re.match(r"Done: \d+ tokens in .* tokens/s on cpu@test", line), line
    sent = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Italy?"}]
    assert second.prompt_tokens == chat_prompt_tokens(tiny_model, sent)  # the second request had 3 messages


def test_chat_cancel_keeps_the_partial_answer(apps: dict[str, UiApp]) -> None:
    job = apps["farm"].client().submit("Tell me a long story", [], *{**CHAT_DEFAULTS, "new_tokens": 1024}.values(),
                                       api_name="/chat")
    wait_until(lambda: any(texts(u[1])[-1][1] for u in job.outputs() if len(u[1]) == 2),  # type: ignore[attr-defined]
               60, "no partial answer")
    _, history, request_id, _ = job.outputs()[-1]  # type: ignore[attr-defined]
    status, history, _ = apps["farm"].client().predict(request_id, history, api_name="/chat_cancel")
    stored = FarmClient(apps["farm"].redis_url).handle(request_id).result(timeout=30)
    assert stored.finish_reason == "cancelled" and 0 < stored.completion_tokens < 1024
    assert status == f"**Cancelled** after {stored.completion_tokens} tokens."
    assert texts(history) == [("user", "Tell me a long story"), ("assistant", stored.text)]

