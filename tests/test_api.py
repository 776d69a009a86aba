"""``farm api`` through the real ``openai`` SDK: a real API process, Redis and worker (tiny model)."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from bench.procs import free_port
from producer import FarmClient
from bench.api import ApiProcess
from tests.api_server import module_api_server, sdk_client, start_api
from tests.conftest import RedisServer, WorkerProcess, wait_until

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
LONG = {"max_tokens": 1024, "extra_body": {"ignore_eos": True}}


api_server = module_api_server("api")


@pytest.fixture()
def oai(api_server: ApiProcess) -> openai.OpenAI:
    return sdk_client(api_server)


def test_models_lists_the_model_and_each_adapter(oai: openai.OpenAI) -> None:
    ids = sorted(m.id for m in oai.models.list())
    assert ids == ["tiny", "tiny:base", "tiny:default", "tiny:second"]
    assert oai.models.retrieve("tiny:second").id == "tiny:second"


def test_chat_goes_through_the_chat_template_like_farm_client(oai: openai.OpenAI, client: FarmClient) -> None:
    answer = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12)  # type: ignore[arg-type]
    farm = client.generate(messages=CHAT, max_new_tokens=12, timeout=60)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == farm.text
    assert answer.choices[0].finish_reason == ("length" if farm.finish_reason == "length" else "stop")
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (farm.prompt_tokens, farm.completion_tokens)
    assert answer.usage.total_tokens == farm.prompt_tokens + farm.completion_tokens


def test_completions_take_a_prompt_or_a_list(oai: openai.OpenAI, client: FarmClient) -> None:
    prompts = ["The list type", "def f():"]
    expected = [client.generate(p, max_new_tokens=10, timeout=60).text for p in prompts]
    one = oai.completions.create(model="tiny", prompt=prompts[0], max_tokens=10)
    many = oai.completions.create(model="tiny", prompt=prompts, max_tokens=10)
    assert one.object == "text_completion" and one.id.startswith("cmpl-")
    assert one.choices[0].text == expected[0]
    assert [c.index for c in many.choices] == [0, 1]
    assert [c.text for c in many.choices] == expected


def test_adapter_model_ids_pick_the_adapter(oai: openai.OpenAI, client: FarmClient) -> None:
    for adapter in ("base", "second"):
        answer = oai.completions.create(model=f"tiny:{adapter}", prompt="Adapters", max_tokens=10)
        farm = client.generate("Adapters", adapter=adapter, max_new_tokens=10, timeout=60)
        assert answer.choices[0].text == farm.text


def test_n_choices_with_a_seed_are_reproducible(oai: openai.OpenAI) -> None:
    params = {"model": "tiny", "messages": CHAT, "max_tokens": 16, "temperature": 1.0, "top_p": 0.95,
              "seed": 7, "n": 2}
    first, second = (oai.chat.completions.create(**params) for _ in range(2))  # type: ignore[call-overload]
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    other = oai.chat.completions.create(**{**params, "seed": 8, "n": 1})  # type: ignore[call-overload]
    assert other.choices[0].message.content != first.choices[0].message.content
    assert first.usage is not None and first.usage.prompt_tokens == other.usage.prompt_tokens  # type: ignore[union-attr]


def test_stop_string_ends_the_text(oai: openai.OpenAI) -> None:
    free = oai.completions.create(model="tiny:base", prompt="The list type", max_tokens=30).choices[0].text
    stop = free[5:7]
    stopped = oai.completions.create(model="tiny:base", prompt="The list type", max_tokens=30, stop=stop)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == free[: free.index(stop)]
    listed = oai.completions.create(model="tiny:base", prompt="The list type", max_tokens=30, stop=[stop, "zzz"])
    assert listed.choices[0].text == stopped.choices[0].text


def test_chat_stream_deltas_join_to_the_text_and_end_with_usage(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40)  # type: ignore[arg-type]
    chunks = list(oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, stream=True,  # type: ignore[call-overload]
                                              stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for d in deltas if d) > 1
    assert "".join(deltas) == whole.choices[0].message.content
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_completion_stream_of_two_choices(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(model="tiny", prompt=["Streaming is", "def f():"], max_tokens=20)
    texts = ["", ""]
    reasons: list[str | None] = [None, None]
    for chunk in oai.completions.create(model="tiny", prompt=["Streaming is", "def f():"], max_tokens=20, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
        assert chunk.usage is None
    assert texts == [c.text for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]


def test_a_client_that_disconnects_cancels_its_request(api_server: ApiProcess, client: FarmClient) -> None:
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 1024, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{api_server.base_url}/chat/completions", json=body, timeout=60) as response:
        request_id = response.headers["x-farm-request-ids"]
        lines = response.iter_lines()
        assert next(line for line in lines if '"content":"' in line and '"content":""' not in line)
    result = client.handle(request_id).result(timeout=30)
    assert result.finish_reason == "cancelled"
    assert 0 < result.completion_tokens < 1024


@pytest.mark.parametrize(("params", "param", "message"), [
    ({"logprobs": True}, "logprobs", "logprobs: is not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools: is not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "is not supported"),
    ({"logit_bias": {"42": 5}}, "logit_bias", "is not supported"),
    ({"max_tokens": 5000}, "max_tokens", "max_tokens: must be between 1 and 1024, got 5000"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "must be between 1 and 1024, got 0"),
    ({"temperature": "hot"}, "temperature", "temperature: must be a number, got str"),
    ({"n": 99}, "n", "n: must be an integer between 1 and 16"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 strings"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": "x" * 16001}]}, "messages", "over the limit of 16000"),
])
def test_bad_fields_are_400_naming_the_field(oai: openai.OpenAI, params: dict[str, object], param: str,
                                             message: str) -> None:
    body = {"model": "tiny", "messages": CHAT, **params}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(**body)  # type: ignore[call-overload]
    assert caught.value.param == param
    assert message in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]


def test_unknown_model_is_404_with_the_served_list(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oai.completions.create(model="gpt-4o", prompt="hi", max_tokens=4)
    assert caught.value.param == "model" and caught.value.code == "model_not_found"
    assert "tiny, tiny:base" in caught.value.message


def test_no_worker_and_no_redis_are_503(redis_server: RedisServer, tmp_path: Path) -> None:
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    empty = redis_server.url("api-no-worker")  # no worker beats there
    for url in (empty, nobody):
        server = start_api(url, tmp_path)
        try:
            oai = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
            with pytest.raises(openai.InternalServerError) as caught:
                oai.chat.completions.create(model="tiny", messages=CHAT)  # type: ignore[arg-type]
            assert caught.value.status_code == 503
            assert caught.value.code in ("no_worker", "redis_unreachable")
            assert httpx.get(f"{server.root}/health").status_code == (200 if url == empty else 503)
        finally:
            server.close()


def test_a_full_queue_is_429_with_retry_after(farm_worker: WorkerProcess, redis_server: RedisServer,
                                             tmp_path: Path) -> None:
    # db 6 holds a copy of the live worker's heartbeat but no worker takes its queue: it fills.
    url = redis_server.url("api-models")
    key = f"farm:worker:{farm_worker.name}"
    redis_server.client("api-models").set(key, redis_server.client(0).get(key) or b"")
    FarmClient(url).submit("waiting", max_new_tokens=2)
    server = start_api(url, tmp_path, api_max_queue=1)
    try:
        oai = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as caught:
            oai.completions.create(model="tiny", prompt="hi", max_tokens=4)
        assert caught.value.code == "queue_full" and "FARM_API_MAX_QUEUE" in caught.value.message
        assert caught.value.response.headers["retry-after"] == "1"
    finally:
        server.close()
        redis_server.client("api-models").flushdb()


def test_metrics_count_requests_by_endpoint_model_and_status(oai: openai.OpenAI, api_server: ApiProcess) -> None:
    oai.completions.create(model="tiny", prompt="metrics", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nope", prompt="metrics", max_tokens=2)
    text = httpx.get(f"{api_server.root}/metrics").text
    assert 'farm_api_requests_total{endpoint="/v1/completions",model="tiny",status="200"}' in text
    assert 'farm_api_errors_total{code="model_not_found",endpoint="/v1/completions",model="-",status="404"}' in text
    assert 'farm_api_first_byte_seconds_count' in text and "farm_api_request_seconds_bucket" in text



def test_a_client_that_gives_up_waiting_cancels_its_request(api_server: ApiProcess, client: FarmClient,
                                                            redis_server: RedisServer) -> None:
    body = {"model": "tiny", "prompt": "A long story", "max_tokens": 1024, "ignore_eos": True}
    flags = redis_server.client()
    before = set(flags.scan_iter(match="farm:cancel:*"))
    with pytest.raises(httpx.ReadTimeout):
        # Gives up long before 1024 tokens can be done (the tiny model ran them in ~1 s): the row is
        # cancelled while it waits or while it runs, never finished.
        httpx.post(f"{api_server.base_url}/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    wait_until(lambda: set(flags.scan_iter(match="farm:cancel:*")) - before, 30, "the request was not cancelled")
    (flag,) = set(flags.scan_iter(match="farm:cancel:*")) - before
    result = client.handle(flag.decode().removeprefix("farm:cancel:")).result(timeout=30)
    assert result.finish_reason == "cancelled" and result.completion_tokens < 1024
    metrics = httpx.get(f"{api_server.root}/metrics").text
    assert 'farm_api_requests_total{endpoint="/v1/completions",model="tiny",status="499"} 1.0' in metrics


def test_the_bulk_queue_header_sends_behind_interactive_traffic(farm_worker: WorkerProcess,
                                                               redis_server: RedisServer, tmp_path: Path) -> None:
    # db 7 holds a copy of the live worker's heartbeat but no worker takes its queues: messages stay.
    key, db = f"farm:worker:{farm_worker.name}", redis_server.client("api-metrics")
    db.set(key, redis_server.client(0).get(key) or b"")
    server = start_api(redis_server.url("api-metrics"), tmp_path)
    try:
        body = {"model": "tiny", "prompt": "batch-like", "max_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{server.base_url}/completions", json=body, headers={"X-Farm-Queue": "bulk"}):
            # Named, the model's own queues (routing); the plain ones stay empty.
            assert (db.llen("bulk.tiny"), db.llen("interactive.tiny"), db.llen("bulk")) == (1, 0, 0)
        oai = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            oai.with_options(default_headers={"X-Farm-Queue": "fast"}).completions.create(
                model="tiny", prompt="hi", max_tokens=4)
        assert caught.value.param == "X-Farm-Queue" and "interactive, bulk" in caught.value.message
    finally:
        server.close()
        db.flushdb()


def test_a_request_that_fails_in_the_worker_is_an_error_streaming_or_not(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        oai.completions.create(model="tiny", prompt="bad <<poison>>", max_tokens=4)
    assert caught.value.status_code == 500 and caught.value.code == "generation_failed"
    with pytest.raises(openai.APIError, match="poison"):
        list(oai.completions.create(model="tiny", prompt="bad <<poison>>", max_tokens=4, stream=True))
