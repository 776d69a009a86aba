"""One API request from parsed body to answer: check it against the farm, enqueue its choices,
then wait for their results or stream their text."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request

from api.errors import ApiError, from_farm, from_result_error
from api.farm import ADAPTER_SEPARATOR, Farm, served_models
from api.keys import KeyLimits, Lease
from api.metrics import Observation
from api.responses import DONE, Reply, finish_reason, sse
from api.translate import ApiCall
from protocol.errors import ErrorCode, RequestError
from protocol.schema import GenerationRequest, GenerationResult, Limits
from protocol.settings import FarmSettings


DISCONNECT_CHECK_S = 0.5
"""How often a request that does not stream checks its client is still waiting."""


class Service:
    """The steps of a generation request, shared by the chat and completions endpoints."""

    def __init__(self, settings: FarmSettings, farm: Farm, limits: KeyLimits) -> None:
        self.settings, self.farm, self.limits = settings, farm, limits

    async def prepare(self, call: ApiCall, obs: Observation) -> list[GenerationRequest]:
        """The call's farm requests, validated by the farm's own rules; or the reason it cannot
        be served now (unknown model, no worker, a full queue)."""
        workers = await self.farm.workers()
        if not workers:
            raise ApiError(503, "no worker is serving: start one with `./farm worker` (or `./farm up`)",
                           None, ErrorCode.NO_WORKER.value, retry_after=5)
        requests = farm_requests(call, served_models(workers), self.farm.limits(workers))
        obs.model = call.model
        await self._check_queue()
        return requests

    async def _check_queue(self) -> None:
        depth, most = await self.farm.queue_depth(), self.settings.api_max_queue
        if depth >= most:
            raise ApiError(429, f"the farm's queue is full ({depth} requests waiting, the limit is "
                           f"{most}, FARM_API_MAX_QUEUE); retry shortly", None,
                           ErrorCode.QUEUE_FULL.value, retry_after=1)

    async def complete(self, call: ApiCall, request_ids: list[str], request: Request) -> dict[str, Any] | None:
        """The whole answer; ``None`` when the client left first (its requests are cancelled)."""
        checked = time.monotonic()
        async with _cancelled_unless_finished(self.farm, request_ids) as guard, \
                aclosing(self.farm.events(request_ids)) as events:
            async for _index, _event in events:
                if time.monotonic() - checked >= DISCONNECT_CHECK_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return None
            results = await self.farm.results(request_ids)
            guard.finished = True
        for result in results:
            if result.finish_reason == "error" and result.error:
                raise from_result_error(result.error, call.rename)
        return Reply(call.chat, call.model).body(results, call.n)

    async def stream(self, call: ApiCall, request_ids: list[str], obs: Observation,
                     lease: Lease | None) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format. Closing it early (the client went away)
        cancels the requests in the farm."""
        chunks = _Chunks(call, Reply(call.chat, call.model), len(request_ids))
        try:
            async with _cancelled_unless_finished(self.farm, request_ids) as guard, \
                    aclosing(self.farm.events(request_ids)) as events:
                for line in chunks.opening():
                    yield line
                async for index, event in events:
                    chunk = chunks.on_event(index, event)
                    if chunk:
                        obs.first_byte()
                        yield chunk
                for line in chunks.closing(await self.farm.results(request_ids)):
                    yield line
                guard.finished = True
        finally:
            with anyio.CancelScope(shield=True):
                obs.done(200)
                await self.limits.release(lease)


def farm_requests(call: ApiCall, served: dict[str, str | None], limits: Limits) -> list[GenerationRequest]:
    """The call's farm requests, validated by the farm's own rules (the online endpoints and
    each line of a batch alike); an unknown model is a 404."""
    if call.model not in served:
        raise ApiError(404, f"model {call.model!r} is not served here (served: {', '.join(served)})",
                       "model", "model_not_found")
    try:
        base = call.model.split(ADAPTER_SEPARATOR)[0]  # routing names the model, the adapter apart
        rows = call.farm_requests(served[call.model], base)
        return [GenerationRequest.from_dict(d, limits) for d in rows]
    except RequestError as error:
        raise from_farm(error, call.rename) from None


@dataclass
class _Guard:
    finished: bool = False


class _cancelled_unless_finished:  # noqa: N801 - used as a context manager, named like one
    """Cancels the requests in the farm unless the block marked them finished; shielded, since
    it runs while the connection's task is being cancelled (the client disconnected)."""

    def __init__(self, farm: Farm, request_ids: list[str]) -> None:
        self.farm, self.request_ids, self.guard = farm, request_ids, _Guard()

    async def __aenter__(self) -> _Guard:
        return self.guard

    async def __aexit__(self, *exc: object) -> None:
        if not self.guard.finished:
            with anyio.CancelScope(shield=True):
                await self.farm.cancel(self.request_ids)


@dataclass
class _Chunks:
    """The stream's chunks from the requests' events: each choice's text as it grows."""

    call: ApiCall
    reply: Reply
    count: int
    texts: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.texts, self.sent = [""] * self.count, [""] * self.count

    def opening(self) -> list[str]:
        if not self.call.chat:
            return []
        return [self.reply.chunk(i, "", first=True, with_usage=self.call.include_usage) for i in range(self.count)]

    def on_event(self, index: int, event: dict[str, Any]) -> str | None:
        kind = event.get("type")
        if index < 0 or kind not in ("start", "delta"):
            return None
        if kind == "start":  # a run restarts from scratch (a lost worker, an OOM split)
            self.texts[index] = ""
            return None
        self.texts[index] += str(event.get("text", ""))
        return self._grow(index, self.texts[index])

    def _grow(self, index: int, text: str) -> str | None:
        """Text beyond what was sent; a rerun that repeats the sent text sends only what is new."""
        if len(text) <= len(self.sent[index]) or not text.startswith(self.sent[index]):
            return None
        piece = text[len(self.sent[index]):]
        self.sent[index] = text
        return self.reply.chunk(index, piece, with_usage=self.call.include_usage)

    def closing(self, results: list[GenerationResult]) -> list[str]:
        """The rest of each text (what the stream missed), the finish reasons, usage, ``[DONE]``."""
        failed = next((r for r in results if r.finish_reason == "error" and r.error), None)
        if failed is not None and failed.error is not None:
            return [sse(from_result_error(failed.error, self.call.rename).body()), DONE]
        lines = [line for i, r in enumerate(results) if (line := self._grow(i, r.text))]
        lines += [self.reply.chunk(i, "", finish_reason(r.finish_reason), with_usage=self.call.include_usage)
                  for i, r in enumerate(results)]
        if self.call.include_usage:
            lines.append(self.reply.usage_chunk(results, self.call.n))
        return [*lines, DONE]

