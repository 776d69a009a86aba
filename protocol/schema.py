"""Request and result schemas, their limits and validation.

Clients validate before enqueueing; workers validate again, since a message can reach the queue
without passing through a client.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from typing import Any

from protocol.errors import ErrorCode, FarmError, RequestError
from protocol.settings import MODEL_NAME_PATTERN, FarmSettings

FINISH_REASONS = ("length", "stop", "cancelled", "error")
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
MAX_MESSAGES = 256
ROLES = ("system", "user", "assistant")
MAX_SEED = 2**63 - 1
MAX_TOP_K = 10000
MAX_TEMPERATURE = 5.0


@dataclass(frozen=True)
class Limits:
    """What a request may ask for; built from settings on both sides."""

    max_prompt_chars: int = 16000
    max_new_tokens: int = 1024
    default_new_tokens: int = 128
    adapters: tuple[str, ...] | None = None
    """Adapter names on offer; ``None`` when unknown (the worker checks again)."""
    max_temperature: float = MAX_TEMPERATURE
    """The highest temperature a request may ask for (forms take their slider's end from it)."""
    models: Mapping[str, tuple[str, ...]] | None = None
    """Models a request may name, each with the adapters it offers; ``None`` when unknown."""
    default_model: str | None = None
    """The model of a request that names none; ``None``: it names none (the plain queues)."""

    @classmethod
    def from_settings(cls, settings: FarmSettings, adapters: list[str] | None = None,
                      models: Mapping[str, tuple[str, ...]] | None = None,
                      default_model: str | None = None) -> Limits:
        return cls(settings.max_prompt_chars, settings.max_new_tokens,
                   min(settings.default_new_tokens, settings.max_new_tokens),
                   tuple(adapters) if adapters is not None else None, models=models,
                   default_model=default_model)

    def adapters_of(self, model: str | None) -> tuple[str, ...] | None:
        """The adapters a request for ``model`` may name (unknown: ``None``)."""
        if model is not None and self.models is not None and model in self.models:
            return self.models[model]
        return self.adapters


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. ``temperature == 0`` is greedy decoding."""

    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter: str | None = None
    ignore_eos: bool = False
    model: str | None = None
    """The model's public name; ``model:adapter`` (as vLLM lists adapters) names an adapter too."""

    @classmethod
    def from_dict(cls, data: Any, limits: Limits) -> GenerationRequest:
        """Validate ``data`` (a plain dict from json) against ``limits``."""
        if not isinstance(data, dict):
            raise RequestError.for_field("request", f"must be an object, got {type(data).__name__}")
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise RequestError.for_field(
                unknown[0], f"unknown parameter (known: {', '.join(sorted(_FIELDS))})")
        prompt, messages = _check_input(data, limits)
        model, named_adapter = _model(data, limits)
        return cls(
            prompt=prompt,
            messages=messages,
            max_new_tokens=_int(data, "max_new_tokens", 1, limits.max_new_tokens,
                                limits.default_new_tokens),
            temperature=_float(data, "temperature", 0.0, MAX_TEMPERATURE, 0.0),
            top_p=_top_p(data),
            top_k=_int(data, "top_k", 0, MAX_TOP_K, 0),
            seed=_seed(data),
            stop=_stop(data),
            adapter=_adapter(data, limits.adapters_of(model), named_adapter),
            ignore_eos=_bool(data, "ignore_eos", False),
            model=model,
        )

    def to_dict(self) -> dict[str, Any]:
        """The json form sent in a task message; defaults left out to keep messages small."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if value != _DEFAULTS[key] or key == "max_new_tokens":
                out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


_DEFAULTS = {k: v for k, v in asdict(GenerationRequest()).items()}
_FIELDS = frozenset(_DEFAULTS)


@dataclass
class GenerationResult:
    """What a worker stores for one request (and what a failed request is reported as)."""

    id: str = ""
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"
    worker: str = ""
    batch_size: int = 0
    queue_seconds: float = 0.0
    generate_seconds: float = 0.0
    first_token_seconds: float | None = None
    adapter: str | None = None
    error: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    """The public name of the model that served the request."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationResult:
        known = {k: v for k, v in data.items() if k in _RESULT_FIELDS}
        return cls(**known)

    @classmethod
    def failed(cls, request_id: str, error: FarmError, **fields: Any) -> GenerationResult:
        reason = "cancelled" if error.code == ErrorCode.CANCELLED.value else "error"
        return cls(id=request_id, finish_reason=reason, error=error.as_dict(), **fields)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0


_RESULT_FIELDS = frozenset(GenerationResult.__dataclass_fields__)


def _check_input(data: dict[str, Any], limits: Limits) -> tuple[str | None, tuple[dict[str, str], ...] | None]:
    prompt, messages = data.get("prompt"), data.get("messages")
    if (prompt is None) == (messages is None):
        raise RequestError.for_field("prompt", "give exactly one of prompt or messages")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise RequestError.for_field("prompt", f"must be a string, got {type(prompt).__name__}")
        _check_text_size("prompt", prompt, limits)
        return prompt, None
    return None, _messages(messages, limits)


def _check_text_size(name: str, text: str, limits: Limits) -> None:
    if not text.strip():
        raise RequestError.for_field(name, "is empty")
    if len(text) > limits.max_prompt_chars:
        raise RequestError.for_field(
            name, f"is {len(text)} characters, over the limit of {limits.max_prompt_chars}",
            ErrorCode.PROMPT_TOO_LONG)


def _messages(value: Any, limits: Limits) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise RequestError.for_field("messages", "must be a non-empty list of {role, content}")
    if len(value) > MAX_MESSAGES:
        raise RequestError.for_field("messages", f"has {len(value)} items, over the limit of {MAX_MESSAGES}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"role", "content"}:
            raise RequestError.for_field(f"messages[{i}]", "must be an object with role and content")
        if item["role"] not in ROLES:
            raise RequestError.for_field(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
        if not isinstance(item["content"], str):
            raise RequestError.for_field(f"messages[{i}].content", "must be a string")
        out.append({"role": item["role"], "content": item["content"]})
    _check_text_size("messages", "".join(m["content"] for m in out), limits)
    return tuple(out)


def _int(data: dict[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError.for_field(name, f"must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise RequestError.for_field(name, f"must be between {low} and {high}, got {value}")
    return value


def _float(data: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError.for_field(name, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not low <= value <= high:
        raise RequestError.for_field(name, f"must be between {low} and {high}, got {value}")
    return float(value)


def _top_p(data: dict[str, Any]) -> float:
    value = _float(data, "top_p", 0.0, 1.0, 1.0)
    if value == 0.0:
        raise RequestError.for_field("top_p", "must be above 0 and at most 1, got 0")
    return value


def _seed(data: dict[str, Any]) -> int | None:
    if data.get("seed") is None:
        return None
    return _int(data, "seed", 0, MAX_SEED, 0)


def _bool(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise RequestError.for_field(name, f"must be true or false, got {type(value).__name__}")
    return value


def _stop(data: dict[str, Any]) -> tuple[str, ...]:
    value = data.get("stop", [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or len(value) > MAX_STOP_SEQUENCES:
        raise RequestError.for_field("stop", f"must be a list of at most {MAX_STOP_SEQUENCES} strings")
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= MAX_STOP_CHARS:
            raise RequestError.for_field("stop", f"each item must be a string of 1 to {MAX_STOP_CHARS} characters")
    return tuple(value)


def _model(data: dict[str, Any], limits: Limits) -> tuple[str | None, str | None]:
    """The model a request is for, and the adapter named in ``model:adapter`` (if any)."""
    value = data.get("model")
    if value is None:
        return _default_model(limits), None
    if not isinstance(value, str) or not value:
        raise RequestError.for_field("model", "must be a non-empty string")
    name, sep, adapter = value.partition(":")
    if not MODEL_NAME_PATTERN.fullmatch(name) or (sep and not adapter):
        raise RequestError.for_field("model", f"{value!r} is not a model name (or model:adapter)")
    if limits.models is not None and name not in limits.models:
        raise RequestError.for_field("model", f"unknown model {name!r} (served: {_names(limits.models)})",
                                     ErrorCode.UNKNOWN_MODEL)
    return name, adapter or None


def _default_model(limits: Limits) -> str | None:
    models, default = limits.models, limits.default_model
    if default is not None and models is not None and default not in models:
        raise RequestError.for_field("model", f"the default model {default!r} (FARM_DEFAULT_MODEL) is not "
                                     f"served (served: {_names(models)})", ErrorCode.UNKNOWN_MODEL)
    if default is None and models is not None and len(models) > 1:
        raise RequestError.for_field("model", f"several models are served ({_names(models)}): name one, "
                                     "or set FARM_DEFAULT_MODEL")
    return default


def _names(models: Mapping[str, Any]) -> str:
    return ", ".join(sorted(models)) or "none"


def _adapter(data: dict[str, Any], offered: tuple[str, ...] | None, named: str | None) -> str | None:
    value = data.get("adapter")
    if named is not None and value is not None and value != named:
        raise RequestError.for_field("adapter", f"{value!r} is not the adapter {named!r} named in model")
    value = named if named is not None else value
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RequestError.for_field("adapter", "must be a non-empty string")
    if offered is not None and value not in offered:
        raise RequestError.for_field(
            "adapter", f"unknown adapter {value!r} (offered: {', '.join(offered)})",
            ErrorCode.UNKNOWN_ADAPTER)
    return value


NAMED_CHECKS: dict[str, Callable[[dict[str, Any], Limits], Any]] = {
    "adapter": lambda data, limits: _adapter(data, limits.adapters_of(None), None),
    "model": _model,
}
"""Request fields that name a resource the workers offer (their heartbeat, in ``Limits``), with
their checks: a prompt file read before the farm is reached is checked for these again once it
is (``producer.files.check_named``). Model routing adds ``"model"`` here."""
