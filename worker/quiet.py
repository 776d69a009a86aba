"""Quiet, truthful worker logs: ids, sizes and timings, never a prompt or a result's text, and
no warning that asks the operator to act when there is nothing to do."""

from __future__ import annotations

import logging
import warnings

LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime).3fs"
"""Celery's default ends with the task's return value: here the whole generated text (users' data
in the log, and many lines per request when the text has newlines)."""


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_logs() -> None:
    """Call once, before the model loads and Celery starts."""
    import celery.app.trace

    celery.app.trace.LOG_SUCCESS = LOG_SUCCESS  # read at each success, so replacing it is enough
    # The task ends a cancelled request with ``Ignore`` once it stored it as REVOKED (worker/tasks.py):
    # Celery's "ignored" would read as if the request had been dropped.
    celery.app.trace.log_policy_ignore = celery.app.trace.log_policy_t(
        celery.app.trace.LOG_IGNORED, "cancelled (stored as REVOKED)", logging.INFO, 0, 0)
    # The optional ``kernels`` package only adds a faster 4-bit matmul on AVX512-bf16 CPUs;
    # bitsandbytes falls back to its own kernel, so the missing module changes nothing.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community"))
    # Celery refuses to run as root only when pickle is accepted; the farm accepts json only, and
    # containers run as root, so the warning names a risk this worker does not run.
    warnings.filterwarnings("ignore", message="You're running the worker with superuser privileges")
    # peft asks transformers for the old name; the new one is used once peft does.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
