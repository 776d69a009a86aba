"""The ``farm`` command: each subcommand lives in the module that owns it, imported on demand
so that client commands never import torch."""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("ops.up", "run the whole farm on this machine (Redis if needed, workers, Flower, UI)"),
    "worker": ("worker.main", "start worker processes (--device cpu|cuda:N|auto)"),
    "make-model": ("ops.make_model", "build a local model and its adapters (--size tiny|demo|bench|llama32k)"),
    "submit": ("producer.cli", "run a bulk job from a JSONL/CSV/text file, results in input order"),
    "job": ("producer.cli", "status or cancel a bulk job: farm job status|cancel ID"),
    "generate": ("producer.cli", "generate one completion and stream it to the terminal"),
    "status": ("ops.status", "Redis, workers, queues and batch stats in one screen"),
    "ui": ("ui.app", "start the Gradio UI only"),
    "api": ("api.main", "start the OpenAI-compatible HTTP API (/v1) only"),
    "flower": ("ops.flower", "start Flower (monitoring) for the farm"),
    "bench": ("bench.__main__", "benchmark the farm against the baselines"),
    "test": ("ops.testing", "lint and run the test suite (what CI runs)"),
}


def usage() -> str:
    lines = ["usage: farm COMMAND [options]   (farm COMMAND --help for a command's options)", ""]
    lines += [f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"farm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if COMMANDS[name][0] == "producer.cli":
        rest = args
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
