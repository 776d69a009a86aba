"""Pure tests of the API's translation from OpenAI bodies to farm requests, and of its replies."""

from __future__ import annotations

from typing import Any

import pytest

from api.errors import ApiError, from_farm
from api.farm import served_models
from api.responses import Reply, usage
from api.translate import chat_call, completion_call
from protocol.errors import RequestError
from protocol.schema import GenerationResult

CHAT = [{"role": "user", "content": "hi"}]


def test_sdk_defaults_that_ask_for_nothing_are_accepted() -> None:
    call = chat_call({"model": "m", "messages": CHAT, "logprobs": False, "presence_penalty": 0,
                      "frequency_penalty": 0.0, "tools": [], "response_format": {"type": "text"},
                      "logit_bias": None, "user": "u1", "parallel_tool_calls": True})
    assert call.farm_requests(None) == [{"messages": CHAT}]


@pytest.mark.parametrize(("body", "param"), [
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"echo": True}, "echo"),
    ({"beam_width": 4}, "beam_width"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"model": ""}, "model"),
])
def test_refused_fields_are_named(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        chat_call({"model": "m", "messages": CHAT, **body})
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.message.startswith(param + ":")


def test_messages_take_text_parts_and_the_developer_role() -> None:
    call = chat_call({"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
        {"role": "user", "content": "hi", "name": "ann"}]})
    assert call.inputs[0]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_choices_are_prompt_major_and_seeds_step_per_choice() -> None:
    call = completion_call({"model": "m", "prompt": ["a", "b"], "n": 2, "seed": 10, "max_tokens": 5,
                            "stop": "x", "top_k": 3, "ignore_eos": True})
    rows = call.farm_requests("second")
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a", 10), ("a", 11), ("b", 10), ("b", 11)]
    assert rows[0] == {"prompt": "a", "seed": 10, "max_new_tokens": 5, "stop": "x", "top_k": 3,
                       "ignore_eos": True, "adapter": "second"}


def test_token_id_prompts_are_refused() -> None:
    with pytest.raises(ApiError, match="token id arrays"):
        completion_call({"model": "m", "prompt": [[1, 2, 3]]})


def test_farm_field_names_are_renamed_to_the_callers() -> None:
    call = chat_call({"model": "m", "messages": CHAT, "max_completion_tokens": 9999})
    error = from_farm(RequestError.for_field("max_new_tokens", "must be between 1 and 1024, got 9999"), call.rename)
    assert (error.param, error.message) == ("max_completion_tokens", "max_completion_tokens: must be between "
                                            "1 and 1024, got 9999")


def test_models_are_the_last_path_part_and_each_adapter() -> None:
    workers = [{"model": "/srv/models/demo/", "adapters": ["base", "pirate"]}, {"model": "demo", "adapters": []}]
    assert served_models(workers) == {"demo": None, "demo:base": "base", "demo:pirate": "pirate"}


def test_usage_counts_a_shared_prompt_once() -> None:
    results = [GenerationResult(prompt_tokens=p, completion_tokens=c) for p, c in [(5, 2), (5, 3), (7, 1), (7, 4)]]
    assert usage(results, n=2) == {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22}
    body = Reply(chat=False, model="m").body(results[:1])
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]


def test_farm_up_starts_the_api_only_where_it_may_listen() -> None:
    from ops.up import api_spec
    from protocol.settings import FarmSettings

    spec = api_spec({"FARM_REDIS_URL": "redis://h/0"}, "127.0.0.1", FarmSettings())
    assert spec is not None and spec.cmd[-2:] == ["-m", "api.main"] and spec.env["FARM_API_HOST"] == "127.0.0.1"
    assert api_spec({}, "0.0.0.0", FarmSettings()) is None
    assert api_spec({}, "0.0.0.0", FarmSettings(api_keys="k")) is not None
