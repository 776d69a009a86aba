"""OpenAI response bodies and stream chunks (pure), with ids, ``object`` and ``created`` as
OpenAI returns them."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from protocol.schema import GenerationResult

DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class Reply:
    """What every body and chunk of one answer shares."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def head(self, chunk: bool = False) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat and chunk else self.object
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def body(self, results: list[GenerationResult], n: int = 1) -> dict[str, Any]:
        """The whole answer of a request that did not stream."""
        choices = [self.choice(i, r.text, finish_reason(r.finish_reason)) for i, r in enumerate(results)]
        return {**self.head(), "choices": choices, "usage": usage(results, n)}

    def choice(self, index: int, text: str, reason: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    def chunk(self, index: int, text: str, reason: str | None = None, first: bool = False,
              with_usage: bool = False) -> str:
        """One ``data:`` line with a delta (the first of a chat choice also carries the role)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            if reason is not None and not text:
                delta = {}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
        data = {**self.head(chunk=True), "choices": [choice]}
        if with_usage:
            data["usage"] = None
        return sse(data)

    def usage_chunk(self, results: list[GenerationResult], n: int = 1) -> str:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        return sse({**self.head(chunk=True), "choices": [], "usage": usage(results, n)})


def usage(results: list[GenerationResult], n: int = 1) -> dict[str, int]:
    """The worker's token counts; a prompt shared by ``n`` choices counts once, as OpenAI's does."""
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(reason: str | None) -> str:
    """``stop`` or ``length``; a row cancelled by someone else ended early, like a stop."""
    return "length" if reason == "length" else "stop"


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def model_list(ids: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(i, created) for i in ids]}


def model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "batchfarm"}
