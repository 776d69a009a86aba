"""``farm submit``, ``farm job status|cancel`` and ``farm generate``: the producer's commands.

A user mistake (a bad row, a missing file, an unknown option value) or an unreachable farm is
one line on stderr and a non-zero exit, never a traceback. Exit status: 0 every row succeeded,
1 some rows failed or were cancelled (they are in the output with their error) or the farm is
unreachable, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from producer.client import FarmClient
from producer.files import (FORMATS, PromptFileError, ResultFileError, Written, check_named, check_rows, choose_job_id,
                            iter_rows, result_line, scan_results)
from producer.jobs import Job, JobProgress, format_duration
from producer.watch import watching
from protocol.errors import FarmError, FarmUnavailable, SettingsError
from protocol.schema import GenerationResult, Limits
from protocol.settings import FarmSettings

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
USAGE = """usage: farm submit FILE -o OUT [--job-id ID] [--max-new-tokens N ...]
       farm submit FILE --detach [--job-id ID] [--max-new-tokens N ...]
       farm job status|cancel|results ID [-o OUT]
       farm generate PROMPT [--max-new-tokens N ...]"""


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``argv`` starts with the command name (``submit``, ``job`` or ``generate``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"submit": submit_command, "job": job_command, "generate": generate_command}
    if not args or args[0] not in commands:
        print(USAGE, file=sys.stderr)
        return EXIT_INPUT
    try:
        return commands[args[0]](args[1:])
    except FarmUnavailable as error:
        return _fail(args[0], str(error), EXIT_FAILED)
    except (FarmError, PromptFileError, ResultFileError, SettingsError) as error:
        return _fail(args[0], str(error), EXIT_INPUT)
    except KeyboardInterrupt:
        return _fail(args[0], "interrupted", EXIT_INTERRUPTED)


def _fail(command: str, message: str, code: int) -> int:
    print(f"farm {command}: {message}", file=sys.stderr)
    return code


# --- shared options -----------------------------------------------------------------------------
def _add_request_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation parameters (a row's own values win)")
    group.add_argument("--max-new-tokens", type=int)
    group.add_argument("--temperature", type=float, help="0 (the default) is greedy decoding")
    group.add_argument("--top-p", type=float)
    group.add_argument("--top-k", type=int)
    group.add_argument("--seed", type=int)
    group.add_argument("--adapter", help="LoRA adapter name ('base' for none)")
    group.add_argument("--model", help="the model to run on, by its public name (or model:adapter); "
                       "default FARM_DEFAULT_MODEL, else the only model served")
    group.add_argument("--stop", action="append", help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", default=None)
    parser.add_argument("--redis-url", help="the farm's Redis (default: FARM_REDIS_URL)")


def request_params(args: argparse.Namespace) -> dict[str, Any]:
    """The generation parameters given on the command line (unset ones left out)."""
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "adapter", "stop", "ignore_eos", "model")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _client(args: argparse.Namespace, settings: FarmSettings | None = None) -> FarmClient:
    client = FarmClient(args.redis_url, settings or FarmSettings.from_env())
    client.ping()
    return client


def _warn_without_workers(command: str, client: FarmClient) -> None:
    if not client.workers():
        print(f"farm {command}: no worker is online; requests wait in the queue until one starts "
              "(`farm worker` or `./farm up`)", file=sys.stderr)


# --- farm submit ----------------------------------------------------------------------------------
def submit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="farm submit", description="Run a bulk job from a prompt file; results in input order, "
        "resumable: rerun the same command (or pass the same --job-id) after an interruption.")
    parser.add_argument("file", type=Path, help="prompts: JSONL, CSV (with a header) or text, one per line")
    parser.add_argument("-o", "--output", type=Path, help="results, JSONL in input order (required "
                        "unless --detach)")
    parser.add_argument("--detach", action="store_true", help="hand the job to the farm (its `farm api` "
                        "processes send it) and print its id at once; `farm job results ID` reads it")
    parser.add_argument("--job-id", help="default: the job already in OUT, else derived from the prompts")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="default: by file extension")
    parser.add_argument("--column", default="prompt", help="CSV column holding the prompt")
    parser.add_argument("--window", type=int, help="rows outstanding at once (default FARM_JOB_WINDOW)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    _add_request_options(parser)
    return parser


def submit_command(argv: list[str]) -> int:
    args = submit_parser().parse_args(argv)
    settings = FarmSettings.from_env()
    params = request_params(args)
    if args.detach:
        return detach_command(args, settings, params)
    if args.output is None:
        return _fail("submit", "-o/--output is required (or --detach)", EXIT_INPUT)
    if args.output.resolve() == args.file.resolve():
        return _fail("submit", f"{args.output}: the output file is the prompt file", EXIT_INPUT)
    # Everything is checked before the output file is touched: no partial garbage on error.
    summary = check_rows(args.file, params, Limits.from_settings(settings), args.format, args.column)
    written = scan_results(args.output)
    job_id = choose_job_id(args.job_id, written, summary.fingerprint, args.output)
    client = _client(args, settings)
    check_named(args.file, summary, client.limits())  # adapters: known once the farm is reached
    _warn_without_workers("submit", client)
    rows = (row.data for row in iter_rows(args.file, args.format, args.column))
    job = client.submit_job(rows, job_id, total=summary.rows, window=args.window,
                            fingerprint=summary.fingerprint, **params)
    with job, watching(client.settings, "submit"):  # says so when Redis stops answering
        _announce(job, summary.rows, written, args.output)
        try:
            failed = written.failed + write_results(job, args.output, written, args.quiet)
        except KeyboardInterrupt:
            return _fail("submit", f"interrupted; rerun the same command to resume job {job.id}", EXIT_INTERRUPTED)
        print(job.progress().summary(), file=sys.stderr)
    return EXIT_OK if failed == 0 else EXIT_FAILED


def detach_command(args: argparse.Namespace, settings: FarmSettings, params: dict[str, Any]) -> int:
    """``farm submit --detach``: check and store the rows, print the job id, return."""
    summary = check_rows(args.file, params, Limits.from_settings(settings), args.format, args.column)
    client = _client(args, settings)
    check_named(args.file, summary, client.limits())
    rows = (row.data for row in iter_rows(args.file, args.format, args.column))
    job = client.submit_job(rows, args.job_id or f"j{summary.fingerprint[:20]}", total=summary.rows,
                            window=args.window, fingerprint=summary.fingerprint, detach=True, **params)
    print(job.id)
    print(f"farm submit: job {job.id} ({summary.rows} rows) handed to the farm; follow it with "
          f"`farm job status {job.id}`, read it with `farm job results {job.id}`", file=sys.stderr)
    return EXIT_OK


def _announce(job: Job, total: int, written: Written, output: Path) -> None:
    resumed = f", resuming after the {written.rows} rows already in {output}" if written.rows else ""
    print(f"farm submit: job {job.id}, {total} rows{resumed}", file=sys.stderr)
    progress = job.progress()
    if progress.state == "cancelled":
        print(f"farm submit: job {job.id} was cancelled; its unsent rows are written as cancelled "
              "(pass a new --job-id to run them)", file=sys.stderr)


def write_results(job: Job, output: Path, written: Written, quiet: bool) -> int:
    """Append results in input order after the rows already written, one flushed line each;
    returns how many did not succeed (failed or cancelled)."""
    failed = 0
    with _appender(output, written.size) as append, _progress_display(job, quiet):
        for index, result in enumerate(job.results(written.rows), written.rows):
            append(result_line(job.id, index, result))
            failed += result.finish_reason not in ("length", "stop")
    return failed


@contextmanager
def _appender(output: Path, size: int) -> Iterator[Any]:
    """Writes lines after the first ``size`` bytes (dropping a torn last line); the file is
    created or cut only when the first line is written."""
    handle: IO[str] | None = None

    def append(line: str) -> None:
        nonlocal handle
        if handle is None:
            handle = open(output, "a", encoding="utf-8")
            handle.truncate(size)
        handle.write(line)
        handle.flush()

    try:
        yield append
    finally:
        if handle is not None:
            handle.close()


@contextmanager
def _progress_display(job: Job, quiet: bool) -> Iterator[None]:
    """A progress bar with rate and ETA on stderr (a summary line every 30 s when not a terminal)."""
    if quiet:
        yield
        return
    stop = threading.Event()
    if sys.stderr.isatty():
        target = _rich_progress(job, stop)
    else:
        def target() -> None:
            while not stop.wait(30):
                print(job.progress().summary(), file=sys.stderr, flush=True)
    thread = threading.Thread(target=target, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def _rich_progress(job: Job, stop: threading.Event) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    def run() -> None:
        columns = (TextColumn(f"job {job.id}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}"),
                   TextColumn("{task.fields[failed]}"))
        with Progress(*columns, console=Console(stderr=True), refresh_per_second=4) as bar:
            task = bar.add_task("rows", total=job.total, rate="", eta="-", failed="")
            while True:
                _update_bar(bar, task, job.progress())
                if stop.wait(0.5):
                    _update_bar(bar, task, job.progress())
                    return

    return run


def _update_bar(bar: Any, task: Any, p: JobProgress) -> None:
    eta = "-" if p.eta_seconds is None else format_duration(p.eta_seconds)
    trouble = ", ".join(f"{n} {what}" for n, what in ((p.failed, "failed"), (p.cancelled, "cancelled")) if n)
    bar.update(task, completed=p.completed, total=p.total, eta=eta, failed=trouble,
               rate=f"{p.rows_per_second:.1f} rows/s {p.tokens_per_second:.0f} tok/s")


# --- farm job -------------------------------------------------------------------------------------
def job_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="farm job", description="Follow, stop or read a bulk job by id.")
    parser.add_argument("action", choices=("status", "cancel", "results"))
    parser.add_argument("job_id")
    parser.add_argument("--json", action="store_true", help="status as one JSON object")
    parser.add_argument("-o", "--output", type=Path, help="results: write them here (default: stdout)")
    parser.add_argument("--redis-url", help="the farm's Redis (default: FARM_REDIS_URL)")
    args = parser.parse_args(argv)
    job = _client(args).job(args.job_id)
    if args.action == "results":
        return results_command(job, args.output)
    if args.action == "cancel":
        job.cancel()
    progress = job.progress()
    if args.json:
        print(json.dumps({**dataclasses.asdict(progress), "completed": progress.completed}))
    else:
        print(progress.summary())
    return EXIT_OK


def results_command(job: Job, output: Path | None) -> int:
    """``farm job results ID``: every row's result in input order as JSONL (waiting for rows
    still running), in the format of ``farm submit``'s output."""
    failed = 0
    with job, (open(output, "w", encoding="utf-8") if output else _stdout()) as handle:
        for index, result in enumerate(job.results()):
            handle.write(result_line(job.id, index, result))
            failed += result.finish_reason not in ("length", "stop")
    return EXIT_OK if failed == 0 else EXIT_FAILED


@contextmanager
def _stdout() -> Iterator[IO[str]]:
    yield sys.stdout
    sys.stdout.flush()


# --- farm generate --------------------------------------------------------------------------------
def generate_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="farm generate", description="Generate one completion and "
                                     "stream it to the terminal (interactive queue).")
    parser.add_argument("prompt")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    _add_request_options(parser)
    args = parser.parse_args(argv)
    client = _client(args)
    handle = client.submit(args.prompt, **request_params(args))
    _warn_without_workers("generate", client)
    def say(message: str) -> None:  # a Redis outage while waiting, said at once
        print(f"farm generate: {message}", file=sys.stderr, flush=True)

    try:
        for delta in handle.stream(timeout=args.timeout, on_outage=say):
            sys.stdout.write(delta)
            sys.stdout.flush()
        result = handle.result(timeout=args.timeout, on_outage=say)
    except (KeyboardInterrupt, TimeoutError) as error:
        handle.cancel()
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"no result after {args.timeout}s"
        return _fail("generate", f"{reason}; request {handle.id} cancelled", EXIT_INTERRUPTED
                     if isinstance(error, KeyboardInterrupt) else EXIT_FAILED)
    print()
    return _report(result)


def _report(result: GenerationResult) -> int:
    if result.error:
        return _fail("generate", f"{result.error['code']}: {result.error['message']}", EXIT_FAILED)
    print(f"[{result.completion_tokens} tokens, {result.finish_reason}, {result.worker}, batch of "
          f"{result.batch_size}, queued {result.queue_seconds:.2f}s, {result.tokens_per_second:.1f} tokens/s]",
          file=sys.stderr)
    return EXIT_OK if result.finish_reason != "cancelled" else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
