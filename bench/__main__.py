"""``farm bench`` / ``python -m bench``: batchfarm against its baselines, on one or several models.

Modes: ``sequential`` (plain ``generate``, one prompt at a time), ``gradio-concurrency`` (N threads
on one shared model, no batching), ``static-batch`` (one in-process batched ``generate`` per N
prompts), ``transformers-serve`` (``transformers serve --continuous-batching`` over HTTP) and
``farm-dynamic`` / ``farm-continuous`` (N clients through Redis and a real worker). Every mode runs
the same prompts with the same fixed number of new tokens (EOS ignored), greedy, fp32; each
output is checked against ``sequential``. A second scenario mixes short and long requests to
compare the farm's batching strategies; ``--shared-prefix N`` adds one whose prompts all start
with the same N tokens. ``--models`` sweeps several model shapes in one run, each with the
machine's bounds (``bench.bounds``) and issue 17's targets (``bench.acceptance``). Writes JSON, a
PNG plot and a markdown table per model under ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.run_model import ALL_MODES, OPTIONAL_MODES, Plan, ProgressLog, run_model
from bench.shapes import DEFAULT_SWEEP, Entry, parse_models, resolve

__all__ = ["ALL_MODES", "OPTIONAL_MODES", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers and workers this run started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        plan = _plan(args)
        entries = _entries(args)
    except ValueError as error:
        parser.error(str(error))
    started = time.time()
    log = ProgressLog(args.out)
    records = []
    for entry, stem in entries:
        from protocol.settings import project_root

        records.append(run_model(plan, entry.label, resolve(entry, project_root()), log, args.out))
        records[-1]["argv"] = list(sys.argv[1:] if argv is None else argv)
        _write_model(args.out, stem, records[-1])
    if args.models:
        _write_sweep(args.out, records, round(time.time() - started, 1))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farm bench", description=__doc__.splitlines()[0])
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--model", default="", help="one model path or name (default: the bench shape, built)")
    models.add_argument("--models", default="",
                        help=f"comma-separated shapes (bench, llama32k, demo: built and cached on first use) or "
                             f"model directories, swept in one run (e.g. {DEFAULT_SWEEP})")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=0, help="requests per run (default: 16, 2N, at most 64)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per request (EOS ignored)")
    parser.add_argument("--modes", default=",".join(ALL_MODES),
                        help="comma-separated, of: " + " ".join(ALL_MODES + OPTIONAL_MODES))
    parser.add_argument("--mixed", type=int, default=16, help="clients of the short/long scenario (0: skip it)")
    parser.add_argument("--mixed-requests", type=int, default=32, help="requests of the short/long scenario")
    parser.add_argument("--short-tokens", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, default=256)
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                        help="add a scenario (at 16 clients, or the most given) whose prompts all start with the "
                             "same N tokens, with farm-no-prefix-cache beside farm-continuous (default 0: off)")
    parser.add_argument("--profile-step", action="store_true",
                        help="time and profile a 16-row decode step of each model in the worker's engine")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of every mode (default: every usable core, torch's own default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser


def _plan(args: argparse.Namespace) -> Plan:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    known = ALL_MODES + OPTIONAL_MODES
    unknown = sorted(set(modes) - set(known))
    if unknown:
        raise ValueError(f"--modes: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    try:
        levels = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        raise ValueError(f"--concurrency: expected comma-separated client counts, got {args.concurrency!r}") from None
    if not levels or levels[0] < 1:
        raise ValueError(f"--concurrency: every client count must be at least 1, got {args.concurrency!r}")
    for name in ("requests", "shared_prefix", "mixed", "threads"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens must be at least 1, got {args.new_tokens}")
    return Plan(modes, levels, args.threads or len(os.sched_getaffinity(0)), args.requests, args.new_tokens,
                args.mixed, args.mixed_requests, args.short_tokens, args.long_tokens, args.shared_prefix,
                args.profile_step)


def _entries(args: argparse.Namespace) -> list[tuple[Entry, str]]:
    """The models to run, each with the stem of its files (``bench`` for a single ``--model``)."""
    if args.models:
        return [(entry, entry.label) for entry in parse_models(args.models)]
    if not args.model:
        return [(parse_models("bench")[0], "bench")]
    path = Path(args.model)
    return [(Entry(path.name or "model", path=args.model), "bench")]


def _write_model(out: Path, stem: str, record: dict[str, Any]) -> None:
    from bench.report import model_text, plot, write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", record)
    title = (f"{record['label']} ({record['params'] / 1e6:.0f}M): {record['new_tokens']} new tokens, fp32, "
             f"{record['threads']} torch thread(s), {record['cpus']} CPUs")
    plot(out / f"{stem}.png", record["results"], title)
    text = model_text(record)
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)
    print(f"\nbench: wrote {out / stem}.json, .png, .md", file=sys.stderr)


def _write_sweep(out: Path, records: list[dict[str, Any]], seconds: float) -> None:
    from bench.report import sweep_text

    summary = {"seconds": seconds, "models": [{key: r[key] for key in (
        "label", "model", "params", "machine", "bounds", "step", "acceptance", "api_cost", "api_acceptance",
        "seconds")} for r in records]}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    text = sweep_text(records)
    (out / "sweep.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\nbench: swept {len(records)} model(s) in {seconds:.0f} s; wrote {out / 'sweep.json'}, "
          f"{out / 'sweep.md'}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
