"""Request validation: every invalid request refused with a field-specific message (property-based),
every valid request accepted, and the json form round-trips."""

from __future__ import annotations

import dataclasses

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ErrorCode, RequestError
from protocol.schema import MAX_STOP_SEQUENCES, GenerationRequest, GenerationResult, Limits

LIMITS = Limits(max_prompt_chars=200, max_new_tokens=64, default_new_tokens=16, adapters=("base", "default"))
FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest) if f.init)
"""Every field a request may carry (a new one, such as ``model``, is never taken for an unknown one)."""

prompts = st.text(min_size=1, max_size=200).filter(lambda s: s.strip() != "")
valid_requests = st.fixed_dictionaries(
    {"prompt": prompts},
    optional={
        "max_new_tokens": st.integers(1, 64),
        "temperature": st.floats(0, 5, allow_nan=False),
        "top_p": st.floats(0.01, 1.0),
        "top_k": st.integers(0, 10000),
        "seed": st.none() | st.integers(0, 2**63 - 1),
        "stop": st.lists(st.text(min_size=1, max_size=64), max_size=MAX_STOP_SEQUENCES),
        "adapter": st.sampled_from(["base", "default"]),
        "ignore_eos": st.booleans(),
    })


@settings(max_examples=300, deadline=None)
@given(valid_requests)
def test_no_valid_request_is_refused(data: dict[str, Any]) -> None:
    request = GenerationRequest.from_dict(data, LIMITS)
    assert GenerationRequest.from_dict(request.to_dict(), LIMITS) == request


bad_values: dict[str, st.SearchStrategy[Any]] = {
    "prompt": st.sampled_from(["", "   ", "x" * 201]) | st.integers() | st.none().map(lambda _: ["list"]),
    "max_new_tokens": st.integers(max_value=0) | st.integers(min_value=65) | st.booleans() | st.floats(),
    "temperature": st.floats(min_value=5.0001) | st.floats(max_value=-0.0001) | st.just(float("nan"))
    | st.text(),
    "top_p": st.just(0.0) | st.floats(min_value=1.0001) | st.floats(max_value=-0.0001) | st.booleans(),
    "top_k": st.integers(max_value=-1) | st.integers(min_value=10001) | st.text(),
    "seed": st.integers(max_value=-1) | st.integers(min_value=2**63) | st.text(min_size=1),
    "stop": st.lists(st.text(min_size=1, max_size=3), min_size=5, max_size=8) | st.just([""])
    | st.just(["x" * 65]) | st.integers(),
    "adapter": st.text(min_size=1).filter(lambda s: s not in ("base", "default")) | st.just("") | st.integers(),
    "ignore_eos": st.integers() | st.text(),
}


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(bad_values)).flatmap(lambda f: st.tuples(st.just(f), bad_values[f])))
def test_every_invalid_field_is_refused_naming_it(case: tuple[str, Any]) -> None:
    field, value = case
    data = {"prompt": "hello", field: value}
    with pytest.raises(RequestError) as refused:
        GenerationRequest.from_dict(data, LIMITS)
    assert refused.value.message.startswith(f"{field}:"), refused.value.message


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=20).filter(lambda k: k not in FIELDS), st.integers())
def test_unknown_parameters_are_refused(name: str, value: int) -> None:
    with pytest.raises(RequestError, match="unknown parameter"):
        GenerationRequest.from_dict({"prompt": "hi", name: value}, LIMITS)


@pytest.mark.parametrize("data", [None, [], "prompt", 3])
def test_non_object_requests_are_refused(data: Any) -> None:
    with pytest.raises(RequestError, match="request: must be an object"):
        GenerationRequest.from_dict(data, LIMITS)


def test_prompt_xor_messages_and_message_shape() -> None:
    with pytest.raises(RequestError, match="exactly one of prompt or messages"):
        GenerationRequest.from_dict({}, LIMITS)
    with pytest.raises(RequestError, match=r"messages\[0\]: must be an object with role and content"):
        GenerationRequest.from_dict({"messages": [{"role": "user"}]}, LIMITS)
    with pytest.raises(RequestError, match=r"messages\[0\].role"):
        GenerationRequest.from_dict({"messages": [{"role": "god", "content": "x"}]}, LIMITS)
    chat = GenerationRequest.from_dict({"messages": [{"role": "user", "content": "hi"}]}, LIMITS)
    assert chat.messages == ({"role": "user", "content": "hi"},) and chat.max_new_tokens == 16


def test_limit_messages_name_the_limit_and_code() -> None:
    with pytest.raises(RequestError) as refused:
        GenerationRequest.from_dict({"prompt": "x" * 201}, LIMITS)
    assert refused.value.code == ErrorCode.PROMPT_TOO_LONG
    assert refused.value.message == "prompt: is 201 characters, over the limit of 200"


def test_unknown_adapter_is_accepted_when_adapters_are_unknown() -> None:
    assert GenerationRequest.from_dict({"prompt": "x", "adapter": "any"}, Limits()).adapter == "any"


def test_result_round_trip_and_failure() -> None:
    result = GenerationResult(id="1", text="hi", completion_tokens=4, generate_seconds=2.0)
    assert GenerationResult.from_dict({**result.to_dict(), "future_field": 1}) == result
    assert result.tokens_per_second == 2.0
    failed = GenerationResult.failed("2", RequestError.for_field("prompt", "is empty"))
    assert (failed.finish_reason, failed.error) == ("error", {"code": "invalid_request", "message": "prompt: is empty"})
