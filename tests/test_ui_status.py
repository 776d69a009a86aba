"""The UI's pure parts: status lines, request building from widgets, the Farm tab's tables.
No Gradio, Redis or worker needed."""

from __future__ import annotations

import pytest

from api.batch_store import new_batch
from protocol.errors import ErrorCode, FarmError, RequestError
from protocol.heartbeat import WorkerHeartbeat
from protocol.models import ServedModel
from protocol.schema import GenerationResult
from protocol.settings import FarmSettings
from ui import batches, chat, farm, status
from ui.generate import DEFAULT_ADAPTER_CHOICE, request_data
from ui.models import Picker, interactive_queues, pick


def test_status_lines_name_what_a_person_needs() -> None:
    assert status.queued(0, 2) == "**Queued**: 0 requests ahead in the farm's queue."
    assert status.queued(1, 1) == "**Queued**: 1 request ahead in the farm's queue."
    assert "no worker is online" in status.queued(3, 0)
    assert status.running("gpu0@a", 12) == "**Running** on `gpu0@a` in a batch of 12…"
    done = GenerationResult(id="r", text="hi", completion_tokens=50, generate_seconds=2.0, worker="gpu0@a",
                            batch_size=4, finish_reason="stop")
    assert status.finished(done) == ("**Done**: 50 tokens in 2.00 s, 25.0 tokens/s on `gpu0@a` (batch of 4); "
                                     "finish reason: stop.")
    failed = GenerationResult.failed("r", FarmError(ErrorCode.OUT_OF_MEMORY, "out of memory on cuda:0"))
    assert status.finished(failed) == "**Failed**: out of memory on cuda:0"
    cancelled = GenerationResult(id="r", completion_tokens=7, finish_reason="cancelled")
    assert status.finished(cancelled) == "**Cancelled** after 7 tokens."


@pytest.mark.parametrize(("error", "message"), [
    (RequestError.for_field("prompt", "is empty"), "The prompt is empty: type a prompt, then press Enter or Submit."),
    (RequestError.for_field("prompt", "is 9 characters, over the limit of 8", ErrorCode.PROMPT_TOO_LONG),
     "The prompt is too long: prompt: is 9 characters, over the limit of 8."),
    (FarmError(ErrorCode.NO_WORKER, status.no_worker()), status.no_worker()),
    (FarmError(ErrorCode.QUEUE_FULL, status.queue_full(10, 10)),
     "The farm's queue is full (10 requests waiting, limit 10, FARM_UI_MAX_QUEUE): try again in a moment."),
    (RequestError.for_field("temperature", "must be between 0.0 and 5.0, got 9"),
     "Invalid request: temperature: must be between 0.0 and 5.0, got 9."),
])
def test_refusals_are_sentences_with_the_reason(error: FarmError, message: str) -> None:
    assert status.refused(error) == message


def test_request_data_from_widgets() -> None:
    params = {"max_new_tokens": 32.0, "temperature": 0.5, "top_p": 0.9, "adapter": DEFAULT_ADAPTER_CHOICE,
              "seed": -1}
    assert request_data("hi", False, params) == {"prompt": "hi", "max_new_tokens": 32, "temperature": 0.5,
                                                 "top_p": 0.9}
    chat = request_data("hi", True, {**params, "adapter": "second", "seed": 7.0})
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    assert (chat["adapter"], chat["seed"], "prompt" in chat) == ("second", 7, False)


def test_chat_request_from_the_chatbot_history() -> None:
    """Gradio hands the history back as lists of parts; the request carries plain strings, the
    system prompt first, the new message last, and the widgets' parameters beside them."""
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
               {"role": "assistant", "content": [{"type": "text", "text": " Hel"}, {"type": "text", "text": "lo"}]}]
    data = chat.chat_data(history, "And you?", "Be brief.", {"max_new_tokens": 8.0, "seed": -1,
                                                               "adapter": DEFAULT_ADAPTER_CHOICE})
    assert data == {"max_new_tokens": 8, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello"}, {"role": "user", "content": "And you?"}]}
    assert chat.chat_data([], "Q", "  ", {})["messages"] == [{"role": "user", "content": "Q"}]
    assert chat.shown("assistant", "  x") == {"role": "assistant", "content": [{"type": "text", "text": "  x"}]}


def test_farm_tables_from_heartbeats() -> None:
    beat = WorkerHeartbeat.from_dict({
        "name": "gpu0@a", "device": "cuda:0", "model": "meta-llama/Llama-2-7b-hf", "quant": "int8",
        "adapters": ["base", "default"], "running": 4, "waiting": 2, "batches": 10, "mean_batch_size": 3.5,
        "tokens_per_second": 120.0, "updated_at": 0.0,
        "recent_batches": [{"at": 100.0, "size": 4, "tokens": 200, "seconds": 2.0},
                           {"at": 50.0, "size": 2, "tokens": 10, "seconds": 0.0}]})
    workers = farm.workers_frame([beat])
    assert list(workers.iloc[0])[:9] == ["gpu0@a", "cuda:0", "Llama-2-7b-hf (int8)", "base, default", 4, 2, 10,
                                         3.5, 120.0]
    batches = farm.batches_frame([beat])
    assert list(batches["batch size"]) == [2, 4] and list(batches["tokens/s"]) == [0.0, 100.0]
    text = farm.summary([beat], {"interactive": 3, "bulk": 40}, "http://h:5555/")
    assert text.startswith("**1 worker online** · queued: interactive: 3, bulk: 40 · 120.0 tokens/s")
    assert "No worker online" in farm.summary([], {"interactive": 0, "bulk": 0}, "http://h:5555/")


def test_flower_link_follows_the_host_the_browser_used() -> None:
    settings = FarmSettings(flower_port=5601, ui_host="0.0.0.0")
    assert farm.flower_url(settings, "farm.example:7860") == "http://farm.example:5601/"
    assert farm.flower_url(settings, None) == "http://127.0.0.1:5601/"


ALPHA = ServedModel("alpha", ("base",), ("a@h",), ("interactive.alpha", "interactive", "bulk.alpha", "bulk"))
BETA = ServedModel("beta", ("base", "pirate"), ("b@h",), ("interactive.beta", "bulk.beta"))


def test_model_picker_preselects_the_only_model_and_keeps_a_choice() -> None:
    assert pick([ALPHA], None) == Picker(("alpha",), "alpha", (DEFAULT_ADAPTER_CHOICE, "base"))
    assert pick([ALPHA, BETA], None).model is None  # the person chooses (or FARM_DEFAULT_MODEL does)
    assert pick([ALPHA, BETA], None, default="beta").model == "beta"
    assert pick([ALPHA, BETA], "alpha", default="beta").model == "alpha"
    assert pick([ALPHA, BETA], "gone").model is None
    assert pick([ALPHA, BETA], "beta").adapters == (DEFAULT_ADAPTER_CHOICE, "base", "pirate")
    assert pick([ALPHA, BETA], None).adapters == (DEFAULT_ADAPTER_CHOICE, "base", "pirate")
    assert pick([], None) == Picker((), None, (DEFAULT_ADAPTER_CHOICE,))


def test_a_request_waits_behind_its_models_interactive_queues() -> None:
    """The default model's workers take the plain queue too; another model's only its own."""
    assert interactive_queues([ALPHA, BETA], "alpha") == ["interactive.alpha", "interactive"]
    assert interactive_queues([ALPHA, BETA], "beta") == ["interactive.beta"]
    assert interactive_queues([ALPHA, BETA], None) == ["interactive"]
    assert request_data("hi", False, {"model": "beta"}) == {"prompt": "hi", "model": "beta"}
    assert "model" not in request_data("hi", False, {"model": None})


def test_batches_table_from_batch_objects() -> None:
    batch = new_batch("batch_1", "/v1/chat/completions", "file-in", None, 86400)
    batch.update(status="completed", created_at=0, output_file_id="file-out",
                 request_counts={"total": 3, "completed": 2, "failed": 1}, error_file_id="file-err")
    frame = batches.batches_frame([batch])
    assert list(frame.columns) == batches.BATCH_COLUMNS
    row = list(frame.iloc[0])
    assert row[:3] == ["batch_1", "completed", "2/3 completed, 1 failed"] and row[4:] == ["file-out", "file-err"]
    assert row[3].count(":") == 2 and row[3][:2] in ("19", "20")  # local time of the epoch
    assert "No batch yet" in batches.note(0, False)
    assert "1 batch," in batches.note(1, False) and "the newest 20" in batches.note(20, True)
