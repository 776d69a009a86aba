"""The FastAPI app: routes, keys, errors in OpenAI's shape, metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from api.errors import ApiError, from_farm, read_json
from api.batch_keeper import BatchKeeper
from api.batch_routes import batch_routes
from api.farm import Farm, served_models
from api.files import FileStore
from api.keys import KeyLimits, Keys
from api.metrics import ApiMetrics, Observation
from api.responses import model_card, model_list
from api.service import Service
from api.translate import ApiCall, chat_call, completion_call
from protocol.errors import ErrorCode, FarmError
from protocol.names import INTERACTIVE_QUEUE, QUEUES
from protocol.settings import FarmSettings

BLOCKING_THREADS = 32
"""Threads for the short blocking farm calls (enqueueing, reading stored results)."""
ANSWERED = (ApiError, FarmError, redis.ConnectionError, redis.TimeoutError)
"""Errors answered in OpenAI's shape; anything else is a bug (a 500 with the traceback logged)."""
REQUEST_IDS_HEADER = "X-Farm-Request-Ids"
"""The farm's request ids of an answer's choices: ``farm`` commands and ``FarmClient`` follow them."""
QUEUE_HEADER = "X-Farm-Queue"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Api:
    """What the routes share in one process (no request state: that lives in Redis)."""

    def __init__(self, settings: FarmSettings, keys: Keys) -> None:
        self.settings, self.keys = settings, keys
        self.farm = Farm(settings)
        self.metrics = ApiMetrics()
        self.limits = KeyLimits(self.farm.redis, settings.api_key_concurrency, settings.api_key_rpm)
        self.service = Service(settings, self.farm, self.limits)
        self.started = int(time.time())

    async def generate(self, request: Request, endpoint: str, parse: Callable[[Any], ApiCall]) -> Response:
        obs = Observation(self.metrics, endpoint)
        lease = None
        try:
            key = self.keys.check(request.headers.get("authorization"))
            call = parse(await read_json(request))
            farm_requests = await self.service.prepare(call, obs)
            lease = await self.limits.acquire(key)
            request_ids = await self.farm.send(farm_requests, queue_of(request))
            headers = {REQUEST_IDS_HEADER: ",".join(request_ids)}
            if call.stream:
                events = self.service.stream(call, request_ids, obs, lease)
                lease = None  # the stream releases it when it ends
                return StreamingResponse(events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
            body = await self.service.complete(call, request_ids, request)
            obs.done(200 if body is not None else 499)
            return JSONResponse(body, headers=headers)
        except ANSWERED as error:
            api_error = as_api_error(error)
            obs.done(api_error.status, api_error.code)
            return error_response(api_error)
        finally:
            await self.limits.release(lease)

    async def guarded(self, request: Request, endpoint: str, answer: Callable[[], Awaitable[Any]]) -> Response:
        """A GET endpoint behind the keys, answered with ``answer()`` as json."""
        obs = Observation(self.metrics, endpoint)
        try:
            self.keys.check(request.headers.get("authorization"))
            body = await answer()
        except ANSWERED as error:
            api_error = as_api_error(error)
            obs.done(api_error.status, api_error.code)
            return error_response(api_error)
        obs.done(200)
        return body if isinstance(body, Response) else JSONResponse(body)

    async def model_ids(self) -> list[str]:
        return list(served_models(await self.farm.workers()))

    async def model(self, model_id: str) -> dict[str, Any]:
        served = await self.model_ids()
        if model_id not in served:
            raise ApiError(404, f"model {model_id!r} is not served here (served: {', '.join(served)})",
                           "model", "model_not_found")
        return model_card(model_id, self.started)

    async def health(self) -> Response:
        try:
            await self.farm.ping()
            workers = await self.farm.workers()
        except FarmError as error:
            return JSONResponse({"status": "unavailable", "error": error.message}, status_code=503)
        return JSONResponse({"status": "ok", "workers": len(workers), "models": list(served_models(workers))})


def queue_of(request: Request) -> str:
    """``X-Farm-Queue: bulk`` sends batch-like online traffic behind the people waiting."""
    queue = request.headers.get(QUEUE_HEADER, INTERACTIVE_QUEUE).strip().lower()
    if queue not in QUEUES:
        raise ApiError(400, f"{QUEUE_HEADER}: must be one of {', '.join(QUEUES)}, got {queue!r}",
                       QUEUE_HEADER, "invalid_request")
    return queue


def as_api_error(error: Exception) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, FarmError):
        return from_farm(error)
    return ApiError(503, f"Redis is unreachable ({error})", None, ErrorCode.REDIS_UNREACHABLE.value,
                    retry_after=5)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def create_app(settings: FarmSettings, keys: Keys) -> FastAPI:
    api = Api(settings, keys)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(BLOCKING_THREADS, "farm"))
        runner = api.farm.client.job_runner().start() if settings.job_runner else None
        keeper = BatchKeeper(api.farm.client, FileStore(api.farm.client.redis, settings)).start()
        yield
        await asyncio.to_thread(keeper.stop)
        if runner is not None:
            await asyncio.to_thread(runner.stop)
        await api.farm.close()

    app = FastAPI(title="batchfarm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = api
    _routes(app, api)
    batch_routes(app, api)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        return error_response(ApiError(error.status_code, str(error.detail), None, None))

    @app.exception_handler(Exception)
    async def bug(_request: Request, error: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return error_response(ApiError(500, f"internal error: {type(error).__name__}", None, ErrorCode.INTERNAL.value))

    return app


def _routes(app: FastAPI, api: Api) -> None:
    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await api.generate(request, "/v1/chat/completions", chat_call)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.generate(request, "/v1/completions", completion_call)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await api.guarded(request, "/v1/models", lambda: _listing(api))

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Response:
        return await api.guarded(request, "/v1/models/{id}", lambda: api.model(model_id))

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return await api.guarded(request, "/metrics", lambda: _metrics(api))

    @app.get("/health")
    async def health() -> Response:
        return await api.health()


async def _listing(api: Api) -> dict[str, Any]:
    return model_list(await api.model_ids(), api.started)


async def _metrics(api: Api) -> Response:
    return Response(api.metrics.render(), media_type="text/plain; version=0.0.4")
