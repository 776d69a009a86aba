"""The routes of the Files and Batch APIs (``/v1/files``, ``/v1/batches``), behind the keys."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from api.batches import Batches
from api.errors import ApiError, bad_field, read_json
from api.farm import Farm, served_models
from api.files import FileStore, check_upload, page_limit
from protocol.settings import FarmSettings


class Api(Protocol):
    """What these routes use of the app (``api.app.Api``), so that this module does not import it."""

    settings: FarmSettings
    farm: Farm

    async def guarded(self, request: Request, endpoint: str,
                      answer: Callable[[], Awaitable[Any]]) -> Response: ...


class BatchApi:
    """What the file and batch routes share in one process (their state is in Redis)."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.files = FileStore(api.farm.client.redis, api.settings)
        self.batches = Batches(api.farm.client, self.files)

    async def upload(self, request: Request) -> dict[str, Any]:
        form = await request.form()
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise bad_field("file", "is required: the file's content as a multipart part")
        content = await upload.read(self.api.settings.file_max_bytes + 1)
        check_upload(content, str(purpose or ""), self.api.settings)
        return await asyncio.to_thread(self.files.create, content, upload.filename or "upload.jsonl", "batch")

    async def create(self, request: Request) -> dict[str, Any]:
        body = await read_json(request)
        workers = await self.api.farm.workers()
        if not workers:
            raise ApiError(503, "no worker is serving: a batch's models are checked against the workers'",
                           None, "no_worker", retry_after=5)
        served, limits = served_models(workers), self.api.farm.limits(workers)
        return await asyncio.to_thread(self.batches.create, body, served, limits)


def batch_routes(app: FastAPI, api: Api) -> None:
    batch = BatchApi(api)

    def blocking(call: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
        """The answer computed on the thread pool (it reads Redis with the blocking client)."""
        return lambda: asyncio.to_thread(call)

    @app.post("/v1/files")
    async def upload(request: Request) -> Response:
        return await api.guarded(request, "/v1/files", lambda: batch.upload(request))

    @app.get("/v1/files")
    async def files(request: Request) -> Response:
        query = request.query_params
        return await api.guarded(request, "/v1/files", blocking(
            lambda: batch.files.listing(query.get("purpose"), query.get("after"), page_limit(query.get("limit")))))

    @app.get("/v1/files/{file_id}")
    async def file(request: Request, file_id: str) -> Response:
        return await api.guarded(request, "/v1/files/{id}", blocking(lambda: batch.files.get(file_id)))

    @app.get("/v1/files/{file_id}/content")
    async def content(request: Request, file_id: str) -> Response:
        async def answer() -> Response:
            data = await asyncio.to_thread(batch.files.content, file_id)
            return Response(data, media_type="application/octet-stream")
        return await api.guarded(request, "/v1/files/{id}/content", answer)

    @app.delete("/v1/files/{file_id}")
    async def delete(request: Request, file_id: str) -> Response:
        return await api.guarded(request, "/v1/files/{id}", blocking(lambda: batch.files.delete(file_id)))

    @app.post("/v1/batches")
    async def create(request: Request) -> Response:
        return await api.guarded(request, "/v1/batches", lambda: batch.create(request))

    @app.get("/v1/batches")
    async def batches(request: Request) -> Response:
        query = request.query_params
        return await api.guarded(request, "/v1/batches", blocking(
            lambda: batch.batches.listing(query.get("after"), page_limit(query.get("limit")))))

    @app.get("/v1/batches/{batch_id}")
    async def retrieve(request: Request, batch_id: str) -> Response:
        return await api.guarded(request, "/v1/batches/{id}", blocking(lambda: batch.batches.get(batch_id)))

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel(request: Request, batch_id: str) -> Response:
        return await api.guarded(request, "/v1/batches/{id}/cancel", blocking(lambda: batch.batches.cancel(batch_id)))
