"""What the UI tells a person about a request: one line of Markdown per state.

Words, not emoji: a browser without an emoji font (servers, minimal desktops) shows boxes.

Pure functions of plain values, so they are tested without Gradio, Redis or a worker.
"""

from __future__ import annotations

from protocol.errors import ErrorCode, FarmError
from protocol.schema import GenerationResult

TOAST_SECONDS = 4
"""A warning toast's life. Toasts belong to the page, not to a tab: Gradio's 10 s default kept a
Generate tab's warning over the Bulk tab after a switch; the status line keeps the reason."""


def queued(ahead: int, workers_online: int) -> str:
    if workers_online == 0:
        return "**Queued**, but no worker is online right now: it runs as soon as one starts."
    noun = "request" if ahead == 1 else "requests"
    return f"**Queued**: {ahead} {noun} ahead in the farm's queue."


def running(worker: str | None, batch_size: int | None) -> str:
    where = f"on `{worker}`" if worker else "on a worker"
    batch = f" in a batch of {batch_size}" if batch_size else ""
    return f"**Running** {where}{batch}…"


def finished(result: GenerationResult) -> str:
    """The final line: done with token count and speed, cancelled, or failed with the reason."""
    if result.finish_reason == "cancelled":
        return f"**Cancelled** after {result.completion_tokens} tokens."
    if not result.ok:
        error = result.error or {}
        return f"**Failed**: {error.get('message') or error.get('code') or 'unknown error'}"
    where = f" on `{result.worker}`" if result.worker else ""
    batch = f" (batch of {result.batch_size})" if result.batch_size else ""
    return (f"**Done**: {result.completion_tokens} tokens in {result.generate_seconds:.2f} s, "
            f"{result.tokens_per_second:.1f} tokens/s{where}{batch}; finish reason: {result.finish_reason}.")


def worker_lost(worker: str, visibility_timeout: int) -> str:
    return (f"**Waiting**: worker `{worker}` stopped while running this request. It returns to the queue "
            f"and runs again on another worker, within FARM_VISIBILITY_TIMEOUT ({visibility_timeout} s); "
            "or cancel it and submit again.")


def cancel_pending() -> str:
    return "**Cancelled**: its worker has not answered yet; the request stops as soon as one runs it."


def cancelled_while_queued() -> str:
    return "**Cancelled** before it started: it will not run."


def refused(error: FarmError) -> str:
    """Why a request was not sent, in words a person can act on."""
    code, message = error.code, error.message
    if code == ErrorCode.INVALID_REQUEST and message.endswith("is empty"):
        return "The prompt is empty: type a prompt, then press Enter or Submit."
    if code == ErrorCode.PROMPT_TOO_LONG:
        return f"The prompt is too long: {message}."
    if code == ErrorCode.REDIS_UNREACHABLE:
        return f"The farm is unreachable: {message}."
    if code in (ErrorCode.NO_WORKER, ErrorCode.QUEUE_FULL):
        return message
    return f"Invalid request: {message}."  # after the status line's "Not sent." (not twice)


def no_worker() -> str:
    return ("No worker is online, so nothing would run this request. Start one with "
            "`./farm worker` (or the whole farm with `./farm up`), then try again.")


def queue_full(depth: int, limit: int) -> str:
    return (f"The farm's queue is full ({depth} requests waiting, limit {limit}, FARM_UI_MAX_QUEUE): "
            "try again in a moment.")
