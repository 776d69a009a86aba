"""The Bulk tab: upload prompts, run them as a job (on the chosen model), follow its progress,
download the results; reattach to any job by id; the batches made through the HTTP Batch API.
The job itself is ``producer.jobs.Job``: this only wires it to widgets."""

from __future__ import annotations

import html
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from producer.client import FarmClient
from producer.files import PromptFileError, Written, check_rows, choose_job_id, iter_rows, result_line
from producer.jobs import Job, JobProgress
from protocol.errors import FarmError
from protocol.schema import Limits
from protocol.settings import FarmSettings
from ui import status
from ui.batches import BATCH_COLUMNS, batches_view
from ui.models import DEFAULT_ADAPTER_CHOICE, model_dropdown

FOLLOW_SECONDS = 1.0
"""How often a followed job's progress is shown again."""
BATCHES_REFRESH_SECONDS = 3.0
"""How often the list of batches is read again while the tab is open."""
FILE_TYPES = [".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt"]
BulkOutputs = tuple[str, str, str | None]


class BulkJobs:
    """The jobs of one UI process. A job started here has its rows sent by a thread of this
    process until it finishes, whether or not anyone keeps watching (reattach by id)."""

    def __init__(self, client: FarmClient, results_dir: Path) -> None:
        self.client, self.results_dir = client, results_dir
        self.live: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, path: Path, column: str, job_id: str, params: dict[str, Any]) -> Job:
        """Check every row first (a bad one is named by its line), then start or resume the job.
        Without a job id the id is derived from the prompts, as ``farm submit`` does, so that the
        same upload resumes rather than runs twice."""
        summary = check_rows(path, params, self.client.limits(), "auto", column)
        job_id = choose_job_id(job_id or None, Written(), summary.fingerprint, path)
        rows = (row.data for row in iter_rows(path, "auto", column))
        job = self.client.submit_job(rows, job_id, total=summary.rows, fingerprint=summary.fingerprint, **params)
        with self._lock:
            self.live[job.id] = job
        return job

    def job(self, job_id: str) -> Job:
        with self._lock:
            live = self.live.get(job_id)
        return live or self.client.job(job_id)

    def follow(self, job_id: str) -> Iterator[tuple[JobProgress, Path | None]]:
        """Progress every ``FOLLOW_SECONDS`` until the job ends, then the results file."""
        job = self.job(job_id)
        progress = job.progress()
        while progress.state == "running":
            yield progress, None
            time.sleep(FOLLOW_SECONDS)
            progress = job.progress()
        yield progress, self.write_results(job)

    def write_results(self, job: Job) -> Path:
        """All rows in input order, one JSON line each (the format of ``farm submit -o``)."""
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / f"{job.id}.jsonl"
        partial = path.with_suffix(".part")
        with open(partial, "w", encoding="utf-8") as out:
            for index, result in enumerate(job.results(timeout=60)):
                out.write(result_line(job.id, index, result))
        partial.replace(path)
        return path


def progress_html(progress: JobProgress) -> str:
    total = progress.total if progress.total else max(progress.sent, 1)
    return (f'<progress value="{progress.completed}" max="{total}" style="width:100%;height:1.2em">'
            f"</progress><p>{html.escape(progress.summary())}</p>")


@dataclass(frozen=True)
class BulkTab:
    """What ``ui.app`` wires of the tab: the model picker (filled on page load) and the list of
    batches (refreshed by ``timer`` while the tab is open)."""

    model: gr.Dropdown
    adapter: gr.Dropdown
    timer: gr.Timer
    batches: list[Any]


def build_tab(client: FarmClient, settings: FarmSettings) -> BulkTab:
    """The tab's widgets and events."""
    jobs = BulkJobs(client, Path(tempfile.gettempdir()) / "batchfarm-ui-results")
    upload = gr.File(label="Prompts: JSONL (prompt or messages per line), CSV (a prompt column) or text "
                     "(one prompt per line)", file_types=FILE_TYPES, elem_id="bulk-file")
    with gr.Row():
        model = model_dropdown("bulk-model")
        column = gr.Textbox("prompt", label="CSV prompt column", max_lines=1)
        job_id = gr.Textbox(label="Job id (empty: derived from the prompts; type one to reattach)",
                            max_lines=1, elem_id="job-id")
    with gr.Row():
        max_new = gr.Number(min(settings.default_new_tokens, settings.max_new_tokens), precision=0, minimum=1,
                            maximum=settings.max_new_tokens, label="Max new tokens")
        temperature = gr.Number(0.0, minimum=0.0, maximum=Limits.from_settings(settings).max_temperature,
                                label="Temperature")
        top_p = gr.Number(1.0, minimum=0.05, maximum=1.0, label="Top-p")
        adapter = gr.Dropdown([DEFAULT_ADAPTER_CHOICE], value=DEFAULT_ADAPTER_CHOICE, label="Adapter (LoRA)",
                              visible=False, elem_id="bulk-adapter")
    with gr.Row():
        start = gr.Button("Start job", variant="primary", elem_id="start-job")
        attach = gr.Button("Attach to job id", elem_id="attach-job")
        stop = gr.Button("Cancel job", variant="stop", elem_id="cancel-job")
    progress = gr.HTML("No job yet.", elem_id="job-progress")
    results = gr.File(label="Results (JSONL, input order)", interactive=False, elem_id="job-results")

    def on_start(path: str | None, col: str, given_id: str, new_tokens: float, temp: float, p: float,
                 adapter_name: str, model_name: str | None = None) -> tuple[str, str]:
        return _start(jobs, path, col, given_id, _params(new_tokens, temp, p, adapter_name, model_name))

    # Generator functions, not lambdas returning generators: Gradio streams only the former.
    def on_follow(given_id: str) -> Iterator[BulkOutputs]:
        yield from _follow(jobs, given_id)

    def on_started(started_id: str) -> Iterator[Any]:
        yield from _follow_started(jobs, started_id)

    outputs = [job_id, progress, results]
    started = start.click(on_start, inputs=[upload, column, job_id, max_new, temperature, top_p, adapter, model],
                          outputs=[job_id, progress], api_name="start_job")
    started.then(on_started, inputs=job_id, outputs=outputs, api_visibility="private")
    attach.click(on_follow, inputs=job_id, outputs=outputs, api_name="follow_job")
    stop.click(lambda i: _cancel(jobs, i), inputs=job_id, outputs=progress, api_name="cancel_job")
    timer, batches = _batches_section(client)
    return BulkTab(model, adapter, timer, batches)


def _batches_section(client: FarmClient) -> tuple[gr.Timer, list[Any]]:
    """The batches of the HTTP Batch API, newest first, with their live request counts."""
    gr.Markdown("### Batches (HTTP Batch API)")
    with gr.Row():
        note = gr.Markdown("Loading…", elem_id="batches-note")
        refresh = gr.Button("Refresh", size="sm", scale=0, elem_id="batches-refresh")
    table = gr.Dataframe(headers=BATCH_COLUMNS, interactive=False, label="Batches", elem_id="api-batches")

    def on_refresh() -> tuple[str, Any]:
        return refresh_batches(client)

    timer = gr.Timer(BATCHES_REFRESH_SECONDS, active=False)
    outputs = [note, table]
    refresh.click(on_refresh, outputs=outputs, api_name="batches", show_progress="hidden")
    timer.tick(on_refresh, outputs=outputs, api_visibility="private", show_progress="hidden", concurrency_limit=8)
    return timer, outputs


def refresh_batches(client: FarmClient) -> tuple[str, Any]:
    """The note and the table of batches, as they stand now."""
    view = batches_view(client)
    return view.note, view.batches


def _params(new_tokens: float | None, temp: float | None, p: float | None, adapter: str | None,
            model: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": int(new_tokens or 1), "temperature": float(temp or 0.0),
                              "top_p": float(p or 1.0)}
    if adapter and adapter != DEFAULT_ADAPTER_CHOICE:
        params["adapter"] = adapter
    if model:
        params["model"] = model
    return params


def _start(jobs: BulkJobs, path: str | None, column: str, job_id: str, params: dict[str, Any]) -> tuple[str, str]:
    """The job id and its first progress; an empty id and the reason when it cannot start."""
    if not path:
        return "", _problem("Choose a prompt file first (JSONL, CSV or text).")
    try:
        job = jobs.start(Path(path), column.strip() or "prompt", job_id.strip(), params)
    except PromptFileError as error:
        return "", _problem(f"The prompt file is invalid: {_shown(error, path)}")
    except FarmError as error:
        return "", _problem(f"The job was not started: {error.message}")
    return job.id, progress_html(job.progress())


def _follow(jobs: BulkJobs, job_id: str) -> Iterator[BulkOutputs]:
    job_id = job_id.strip()
    if not job_id:
        yield "", _problem("Type the id of a job to attach to."), None
        return
    try:
        for progress, path in jobs.follow(job_id):
            yield job_id, progress_html(progress), str(path) if path else None
    except FarmError as error:
        yield job_id, _problem(error.message), None


def _follow_started(jobs: BulkJobs, job_id: str) -> Iterator[Any]:
    """After Start: follow the job it started; nothing (the reason stays shown) if it did not."""
    if job_id:
        yield from _follow(jobs, job_id)
    else:
        yield gr.skip(), gr.skip(), gr.skip()


def _cancel(jobs: BulkJobs, job_id: str) -> str:
    if not job_id.strip():
        return _problem("Type the id of the job to cancel.")
    try:
        job = jobs.job(job_id.strip())
        job.cancel()
        return progress_html(job.progress())
    except FarmError as error:
        return _problem(error.message)


def _problem(message: str) -> str:
    """A warning toast, and the reason kept in the progress area (an error would cover it)."""
    gr.Warning(message, duration=status.TOAST_SECONDS)
    return f"<p><b>Not done.</b> {html.escape(message)}</p>"


def _shown(error: PromptFileError, path: str) -> str:
    """The message with the upload's temporary path replaced by its file name."""
    return str(error).replace(path, Path(path).name)
