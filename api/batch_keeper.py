"""The batch keeper: moves every active batch to its end, in each API replica's thread.

``in_progress`` → ``finalizing`` once its job finished (or ``finalizing`` at once, with the job
cancelled, when its completion window is over); ``finalizing`` or ``cancelling`` → the end
(``completed``, ``expired``, ``cancelled``) once no row is in flight, after its output and error
files are written. The writing is done by one replica at a time (a lock key), and again by
another if that one dies; the files' ids come from the batch's, so a second writing replaces.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from api.batch_input import BatchLine
from api.batch_store import FINAL_AT, BatchStore, stamp
from api.batches import not_found
from api.errors import from_result_error
from api.files import FileStore
from api.responses import Reply
from producer import FarmClient
from producer.jobs import Job
from protocol.errors import FarmError
from protocol.names import PREFIX
from protocol.schema import GenerationResult

KEEP_SECONDS = 1.0
LOCK_SECONDS = 120
ENDED_CODES = {"cancelled": ("batch_cancelled", "the batch was cancelled before this request ran"),
               "expired": ("batch_expired", "the batch's completion window ended before this request ran")}

log = logging.getLogger(__name__)


class BatchKeeper:
    def __init__(self, client: FarmClient, files: FileStore) -> None:
        self.client, self.files, self.store = client, files, BatchStore(client)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> BatchKeeper:
        self._thread = threading.Thread(target=self._loop, name="batch-keeper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(KEEP_SECONDS):
            for batch_id in self._active():
                try:
                    self.keep(batch_id)
                except FarmError as error:  # Redis away: the next round tries again
                    log.warning("batch %s: %s", batch_id, error)

    def _active(self) -> list[str]:
        try:
            return self.store.active()
        except Exception as error:  # noqa: BLE001 - Redis away: the next round tries again
            log.warning("batch keeper: %s", error)
            return []

    def keep(self, batch_id: str) -> None:
        """One look at a batch: the next step it is ready for, if any."""
        batch = self.store.find(batch_id)
        if batch is None:
            raise not_found(batch_id)
        status = batch["status"]
        with self.client.job(batch_id) as job:
            if status == "in_progress" and time.time() >= batch["expires_at"]:
                if self.store.update(batch_id, ("in_progress",), stamp("finalizing", "finalizing_at"), end="expired"):
                    job.cancel()
                return
            progress = job.progress()
            if status == "in_progress" and progress.state == "cancelled":  # by `farm job cancel`
                self.store.update(batch_id, ("in_progress",), stamp("cancelling", "cancelling_at"), end="cancelled")
            elif status == "in_progress" and progress.state == "finished":
                self.store.update(batch_id, ("in_progress",), stamp("finalizing", "finalizing_at"), end="completed")
            elif status in ("finalizing", "cancelling") and progress.pending == 0:
                self._finish(batch, job)
            elif status not in ("in_progress", "finalizing", "cancelling"):
                self.store.set_active(batch_id, False)

    def _finish(self, batch: dict[str, Any], job: Job) -> None:
        lock = f"{PREFIX}batch:{batch['id']}:finishing"
        if not self.client.redis.set(lock, "1", nx=True, ex=LOCK_SECONDS):
            return
        end = self.store.end(batch["id"])
        lines = [BatchLine.from_json(item) for item in self.store.lines(batch["id"])]
        outputs, errors = split_lines(lines, job.results(), batch["endpoint"], end)
        ids = {"output_file_id": self._file(batch["id"], "output", outputs),
               "error_file_id": self._file(batch["id"], "error", errors)}
        counts = {"total": len(outputs) + len(errors), "completed": len(outputs), "failed": len(errors)}

        def change(record: dict[str, Any]) -> None:
            stamp(end, FINAL_AT[end])(record)
            record.update(ids, request_counts=counts)
        self.store.update(batch["id"], ("finalizing", "cancelling"), change)
        self.store.set_active(batch["id"], False)
        self.client.redis.delete(lock)

    def _file(self, batch_id: str, kind: str, lines: list[str]) -> str | None:
        if not lines:
            return None
        file_id = f"file-{batch_id.removeprefix('batch_')}-{kind}"
        self.files.create("".join(lines).encode(), f"{batch_id}_{kind}.jsonl", "batch_output", file_id)
        return file_id


def split_lines(lines: list[BatchLine], results: Iterator[GenerationResult], endpoint: str,
                end: str) -> tuple[list[str], list[str]]:
    """The output file's lines (answered requests) and the error file's (the others), in input order."""
    outputs: list[str] = []
    errors: list[str] = []
    chat = endpoint == "/v1/chat/completions"
    for line in lines:
        rows = [next(results) for _ in range(line.count)]
        record = output_record(line, rows, chat, end)
        (outputs if record["error"] is None else errors).append(json.dumps(record, ensure_ascii=False) + "\n")
    return outputs, errors


def output_record(line: BatchLine, rows: list[GenerationResult], chat: bool, end: str) -> dict[str, Any]:
    """One line in OpenAI's shape: the body the online endpoint returns, or the error."""
    head = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id}
    request_id = ",".join(r.id for r in rows)
    failed = next((r for r in rows if r.error is not None and r.finish_reason == "error"), None)
    if failed is not None and failed.error is not None:
        error = from_result_error(failed.error)
        return {**head, "response": {"status_code": error.status, "request_id": request_id, "body": error.body()},
                "error": {"code": error.code, "message": error.message}}
    if any(r.finish_reason == "cancelled" for r in rows):
        code, message = ENDED_CODES.get(end, ENDED_CODES["cancelled"])
        return {**head, "response": None, "error": {"code": code, "message": message}}
    body = Reply(chat, line.model).body(rows, line.n)
    return {**head, "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}
