"""``farm bench`` / ``python -m bench``: batchfarm against its baselines, in one run.

Modes: ``sequential`` (plain ``generate``, one prompt at a time), ``gradio-concurrency`` (N threads
on one shared model, no batching), ``static-batch`` (one in-process batched ``generate`` per N
prompts), ``transformers-serve`` (``transformers serve --continuous-batching`` over HTTP) and
``farm-dynamic`` / ``farm-continuous`` (N clients through Redis and a real worker). Every mode runs
the same prompts with the same fixed number of new tokens (EOS ignored), greedy, fp32; each
output is checked against ``sequential``. A second scenario mixes short and long requests to
compare the farm's batching strategies. Writes JSON, a PNG plot and a markdown table under
``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.local import run_sequential
from bench.workload import Job, Run, make_prompts

ALL_MODES = ("sequential", "gradio-concurrency", "static-batch", "transformers-serve", "farm-dynamic",
             "farm-continuous")
OPTIONAL_MODES = ("farm-openai",)
"""Run only when named in ``--modes``: ``farm-openai`` (the continuous farm behind ``farm api``,
driven by the OpenAI client code of ``transformers-serve``)."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers and workers this run started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    modes = _modes(args.modes)
    model = _model_path(args.model)
    threads = args.threads or len(os.sched_getaffinity(0))
    levels = sorted({int(c) for c in args.concurrency.split(",")})
    record = _run_all(args, modes, model, threads, levels)
    record["argv"] = list(sys.argv[1:] if argv is None else argv)
    _write(args.out, record)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farm bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="model path or name (default: the ~100M random Llama, built)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=0, help="requests per run (default: 16, 2N, at most 64)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per request (EOS ignored)")
    parser.add_argument("--modes", default=",".join(ALL_MODES),
                        help="comma-separated, of: " + " ".join(ALL_MODES + OPTIONAL_MODES))
    parser.add_argument("--mixed", type=int, default=16, help="clients of the short/long scenario (0: skip it)")
    parser.add_argument("--mixed-requests", type=int, default=32, help="requests of the short/long scenario")
    parser.add_argument("--short-tokens", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of every mode (default: every usable core, torch's own default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    known = ALL_MODES + OPTIONAL_MODES
    unknown = sorted(set(modes) - set(known))
    if unknown:
        raise SystemExit(f"farm bench: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return modes


def _model_path(model: str) -> str:
    if model:
        return model
    from ops.make_model import ensure_model
    from protocol.settings import project_root

    return str(ensure_model(project_root() / ".farm" / "models" / "bench", "bench"))


def _jobs(prompts: list[str], count: int, new_tokens: int) -> list[Job]:
    return [Job(i % len(prompts), prompts[i % len(prompts)], new_tokens) for i in range(count)]


def _mixed_jobs(prompts: list[str], count: int, short: int, long: int) -> list[Job]:
    # Long and short alternate, so every batch the dynamic strategy forms holds both.
    return [Job(i % len(prompts), prompts[i % len(prompts)], long if i % 2 == 0 else short,
                "long" if i % 2 == 0 else "short") for i in range(count)]


def _run_all(args: argparse.Namespace, modes: list[str], model: str, threads: int,
             levels: list[int]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    count = {c: args.requests or max(16, min(2 * c, 64)) for c in levels}
    prompts = make_prompts(min(32, max(count.values())))
    log = _Log(args.out)
    started, load_before = time.time(), os.getloadavg()
    with contextlib.ExitStack() as stack:
        servers, local = _start(stack, args, modes, model, threads, levels, log)
        # The reference outputs: every prompt once, alone (also the `sequential` mode's run).
        seq = log(run_sequential(local, _jobs(prompts, len(prompts), args.new_tokens)))
        reference = {s.index: s.text for s in seq.samples}
        runs = [seq] if "sequential" in modes and 1 not in levels else []
        # Modes alternate within each level, so a change in the machine's load hits them alike.
        for c in levels:
            jobs = _jobs(prompts, count[c], args.new_tokens)
            chosen = {mode: serve for mode, serve in servers.items() if mode in modes}
            if c == 1:
                if "sequential" in modes:
                    chosen = {"sequential": lambda jobs, _: run_sequential(local, jobs), **chosen}
                runs += [log(run) for run in _take_turns(chosen, jobs)]
            else:
                runs += [log(serve(jobs, c)) for serve in chosen.values()]
        mixed = []
        if args.mixed:
            jobs = _mixed_jobs(prompts, args.mixed_requests, args.short_tokens, args.long_tokens)
            mixed = [log(serve(jobs, args.mixed)) for mode, serve in servers.items()
                     if mode in ("farm-dynamic", "farm-continuous")]
    rows = [_checked(run, reference) for run in runs]
    mixed_rows = _agreeing([run for run in mixed if not run.unavailable])
    from bench.report import targets
    from protocol.settings import FarmSettings

    # the public name the farm's results carry (``model``), beside the path it was loaded from
    return {"model": model, "model_name": FarmSettings(model=model).served_model_name(),
            "new_tokens": args.new_tokens, "concurrency": levels, "threads": threads,
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "started_at": started, "seconds": round(time.time() - started, 1),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "results": rows, "mixed": mixed_rows, "targets": targets(rows, mixed_rows, _target_level(levels)),
            "samples": {**{f"{r.mode}@{r.concurrency}": [s.__dict__ for s in r.samples] for r in runs},
                        **{f"mixed:{r.mode}@{r.concurrency}": [s.__dict__ for s in r.samples] for r in mixed}}}


def _take_turns(servers: dict[str, Serve], jobs: list[Job]) -> list[Run]:
    """One client: the modes take turns request by request (who goes first rotates), so a drift
    in the machine's speed, common on a shared 2-core host, hits every mode alike. A closed loop
    of one client is a sequence of single requests, so this measures the same thing as running
    each mode's requests in a block; each mode's run is the sum of its turns."""
    names = list(servers)
    runs = {mode: Run(mode, 1) for mode in names}
    for i, job in enumerate(jobs):
        for mode in names[i % len(names):] + names[:i % len(names)]:
            turn, run = servers[mode]([job], 1), runs[mode]
            run.samples += turn.samples
            run.wall += turn.wall
            run.note, run.unavailable = turn.note or run.note, turn.unavailable
    return list(runs.values())


def _target_level(levels: list[int]) -> int:
    return 16 if 16 in levels else max(levels)


class _Log:
    """Reports each run as it ends, on stderr and in ``logs/progress.jsonl`` (a long run that is
    stopped early keeps what it measured)."""

    def __init__(self, out: Path) -> None:
        self.logdir = out / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.progress = self.logdir / "progress.jsonl"
        self.progress.write_text("")

    def __call__(self, run: Run) -> Run:
        summary = run.summary()
        text = summary.get("unavailable") or f"{summary['tokens_per_s']} tok/s, p50 {summary.get('latency_p50')} s"
        print(f"bench: {run.mode} N={run.concurrency}: {text}", file=sys.stderr, flush=True)
        with self.progress.open("a") as progress:
            progress.write(json.dumps({**summary, "loadavg": os.getloadavg()}) + "\n")
        return run


Serve = Callable[[list[Job], int], Run]


def _start(stack: contextlib.ExitStack, args: argparse.Namespace, modes: list[str], model: str, threads: int,
           levels: list[int], log: _Log) -> tuple[dict[str, Serve], Any]:
    """Load the local model and start every server once; each mode as ``serve(jobs, concurrency)``."""
    from bench.local import LocalModel, run_gradio, run_static

    local = LocalModel(model)
    servers: dict[str, Serve] = {
        "gradio-concurrency": lambda jobs, c: run_gradio(local, jobs, c),
        "static-batch": lambda jobs, c: run_static(local, jobs, c),
    }
    if "transformers-serve" in modes:
        servers["transformers-serve"] = _start_serve(stack, model, threads, max(levels), args.new_tokens, log)
    for strategy in ("dynamic", "continuous"):
        if f"farm-{strategy}" in modes:
            servers[f"farm-{strategy}"] = _start_farm(stack, args, model, strategy, threads, levels, log)
    if "farm-openai" in modes:
        servers["farm-openai"] = _start_openai(stack, args, model, threads, levels, log)
    return servers, local


def _unavailable(mode: str, reason: str) -> Serve:
    return lambda jobs, c: Run(mode, c, unavailable=reason)


def _start_serve(stack: contextlib.ExitStack, model: str, threads: int, max_batch: int, new_tokens: int,
                 log: _Log) -> Serve:
    from bench.serve import ServeServer, run_serve, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return _unavailable("transformers-serve", reason)
    try:
        server = ServeServer(model, threads, max_batch, max(new_tokens, 64) + 128, log.logdir)
    except RuntimeError as error:
        return _unavailable("transformers-serve", str(error))
    stack.callback(server.close)
    return lambda jobs, c: run_serve(server, jobs, c)


def _start_farm(stack: contextlib.ExitStack, args: argparse.Namespace, model: str, strategy: str, threads: int,
                levels: list[int], log: _Log) -> Serve:
    from bench.farm import FarmUnderTest, run_farm

    try:
        farm = FarmUnderTest(model, strategy, threads, max(max(levels), args.mixed),
                             max(args.new_tokens, args.long_tokens), log.logdir)
    except RuntimeError as error:
        return _unavailable(f"farm-{strategy}", str(error))
    stack.callback(farm.close)
    return lambda jobs, c: run_farm(farm, jobs, c)


def _start_openai(stack: contextlib.ExitStack, args: argparse.Namespace, model: str, threads: int,
                  levels: list[int], log: _Log) -> Serve:
    from bench.api import FarmOpenAI, run_openai
    from bench.farm import FarmUnderTest

    clients = max(max(levels), args.mixed)
    try:
        farm = FarmUnderTest(model, "continuous", threads, clients, max(args.new_tokens, args.long_tokens),
                             log.logdir / "openai")
        stack.callback(farm.close)
        server = FarmOpenAI(farm.url, model, log.logdir / "openai", clients)
    except RuntimeError as error:
        return _unavailable("farm-openai", str(error))
    stack.callback(server.close)
    return lambda jobs, c: run_openai(server, jobs, c)


def _checked(run: Run, reference: dict[int, str]) -> dict[str, Any]:
    """The run's summary with how many outputs equal the sequential reference."""
    row = run.summary()
    if not run.unavailable:
        same = sum(s.error is None and _same_text(s.text, reference.get(s.index)) for s in run.samples)
        row["identical"] = f"{same}/{len(run.samples)}"
        row["identical_all"] = same == len(run.samples)
    return row


def _same_text(text: str, reference: str | None) -> bool:
    # A token stream holds back an incomplete UTF-8 tail (transformers serve drops it at the end).
    return reference is not None and (text == reference or text.rstrip("\ufffd") == reference.rstrip("\ufffd"))


def _agreeing(mixed: list[Run]) -> list[dict[str, Any]]:
    """Mixed-scenario rows; both strategies must give each request the same text."""
    rows = [run.summary() for run in mixed]
    if len(mixed) == 2:
        first = {(s.index, s.kind): s.text for s in mixed[0].samples}
        same = sum(first.get((s.index, s.kind)) == s.text for s in mixed[1].samples)
        for row in rows:
            row["identical"] = f"{same}/{len(mixed[1].samples)}"
            row["identical_all"] = same == len(mixed[1].samples)
    return rows


def _write(out: Path, record: dict[str, Any]) -> None:
    from bench.report import mixed_table, plot, table, targets_table, write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", record)
    title = (f"{Path(record['model']).name}: {record['new_tokens']} new tokens, fp32, {record['threads']} torch "
             f"thread(s), {record['cpus']} CPUs")
    plot(out / "bench.png", record["results"], title)
    text = "\n\n".join([table(record["results"]), mixed_table(record["mixed"]) if record["mixed"] else "",
                        targets_table(record["targets"])])
    (out / "bench.md").write_text(text + "\n")
    print(text)
    print(f"\nbench: wrote {out / 'bench.json'}, {out / 'bench.png'}, {out / 'bench.md'}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
