"""OpenAI request bodies to farm requests (pure: no Redis, no HTTP).

Each field the farm implements maps onto ``GenerationRequest``; its values are checked by
``GenerationRequest.from_dict`` (the farm's own limits) later, in ``api.service``. A field the farm
does not implement is refused by name rather than silently ignored, unless its value asks for
nothing (``logprobs: false``, ``presence_penalty: 0``, ``null``), which is what SDKs send by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from api.errors import ApiError, bad_field

MAX_N = 16
"""Most choices per prompt (``n``); each is one farm request."""
MAX_PROMPTS = 64
"""Most prompts in one ``/v1/completions`` list."""

COMMON = frozenset({"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
                    "seed", "stream", "stream_options", "user", "top_k", "ignore_eos"})
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "best_of": (1,),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "tools": ([],), "functions": ([],),
    "tool_choice": ("none",), "parallel_tool_calls": (True, False), "logit_bias": ({},),
    "store": (False,), "metadata": ({},), "suffix": ("",), "response_format": ({"type": "text"},),
    "service_tier": ("auto", "default"), "modalities": (["text"],),
}
"""Fields the farm does not implement, with the values that ask for nothing (accepted)."""
UNIMPLEMENTED = frozenset(NEUTRAL) | frozenset({
    "function_call", "audio", "prediction", "reasoning_effort", "web_search_options", "min_p",
    "repetition_penalty", "length_penalty", "use_beam_search", "min_tokens", "verbosity"})
MESSAGE_KEYS = frozenset({"role", "content", "name"})
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ApiCall:
    """One API request in farm terms: the inputs, the shared generation params, how to answer."""

    chat: bool
    model: str
    inputs: tuple[dict[str, Any], ...]
    """``{"prompt": ...}`` or ``{"messages": [...]}``, one per prompt."""
    params: dict[str, Any] = field(default_factory=dict)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    rename: dict[str, str] = field(default_factory=dict)
    """Farm field names to this request's names, for error messages."""

    def farm_requests(self, adapter: str | None, model: str | None = None) -> list[dict[str, Any]]:
        """One request dict per choice, in choice-index order (prompt-major, as OpenAI numbers
        them), routed to ``model`` (its public name, without the adapter). A ``seed`` gives
        choice ``j`` seed ``seed + j``: reproducible, yet distinct."""
        out = []
        for item in self.inputs:
            for j in range(self.n):
                data = {**item, **self.params}
                if data.get("seed") is not None and isinstance(data["seed"], int) and j:
                    data["seed"] = data["seed"] + j
                if adapter is not None:
                    data["adapter"] = adapter
                if model is not None:
                    data["model"] = model
                out.append(data)
        return out


def chat_call(body: Any) -> ApiCall:
    body = _object(body)
    _check_fields(body, COMMON | {"messages"})
    messages = _messages(body.get("messages"))
    return _call(body, True, ({"messages": messages},), {"prompt": "messages"})


def completion_call(body: Any) -> ApiCall:
    body = _object(body)
    _check_fields(body, COMMON | {"prompt"})
    prompts = _prompts(body.get("prompt"))
    return _call(body, False, tuple({"prompt": p} for p in prompts), {})


def _call(body: dict[str, Any], chat: bool, inputs: tuple[dict[str, Any], ...],
          rename: dict[str, str]) -> ApiCall:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_field("model", "is required: a model id from GET /v1/models")
    params, tokens_name = _params(body)
    stream = _flag(body, "stream")
    return ApiCall(chat, model, inputs, params, _n(body), stream, _include_usage(body, stream),
                   {**rename, "max_new_tokens": tokens_name})


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_request")
    return body


def _check_fields(body: dict[str, Any], known: frozenset[str]) -> None:
    for name, value in body.items():
        if name in known or value is None or value in NEUTRAL.get(name, ()):
            continue
        if name in UNIMPLEMENTED:
            raise bad_field(name, "is not supported by this farm", "unsupported_parameter")
        raise bad_field(name, f"unknown parameter (supported: {', '.join(sorted(known))})",
                        "unknown_parameter")


def _params(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Generation params under their farm names, and the name the token limit was given by."""
    params = {k: body[k] for k in ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
              if body.get(k) is not None}
    tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get(tokens_name) is not None:
        params["max_new_tokens"] = body[tokens_name]
    return params, tokens_name


def _n(body: dict[str, Any]) -> int:
    value = body.get("n", 1)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_N:
        raise bad_field("n", f"must be an integer between 1 and {MAX_N}, got {value!r}")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_field(name, f"must be true or false, got {type(value).__name__}")
    return value


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad_field("stream_options", "is only allowed with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise bad_field("stream_options", "must be an object with include_usage (true or false)")
    return _flag(options, "include_usage")


def _prompts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise bad_field("prompt", "must be a string or a non-empty list of strings")
    if len(value) > MAX_PROMPTS:
        raise bad_field("prompt", f"has {len(value)} prompts, over the limit of {MAX_PROMPTS}")
    if not all(isinstance(p, str) for p in value):
        raise bad_field("prompt", "must be strings (token id arrays are not supported)")
    return list(value)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad_field("messages", "must be a non-empty list of {role, content}")
    return [_message(i, item) for i, item in enumerate(value)]


def _message(i: int, item: Any) -> dict[str, str]:
    if not isinstance(item, dict):
        raise bad_field(f"messages[{i}]", "must be an object with role and content")
    for key, value in item.items():
        if key not in MESSAGE_KEYS and value not in (None, []):
            raise bad_field(f"messages[{i}].{key}", "is not supported by this farm", "unsupported_parameter")
    role = item.get("role")
    if role not in ROLES:
        raise bad_field(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    return {"role": ROLES[role], "content": _content(i, item.get("content"))}


def _content(i: int, content: Any) -> str:
    """A string, or a list of text parts (joined); images and audio are not served."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content}
        if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise bad_field(f"messages[{i}].content", f"only text parts are supported, got {sorted(map(str, kinds))}")
    raise bad_field(f"messages[{i}].content", "must be a string or a list of text parts")
