"""One model's part of ``farm bench``: the machine's bounds, its servers, its runs and its checks.

Per model: the bounds are measured (``bench.bounds``), the decode step is profiled when asked
(``bench.profile_step``), every server is started once, the reference outputs come from
``sequential``, then each concurrency level runs the modes in turn (at one client request by
request, see ``take_turns``), then the short/long mix and the shared-prefix scenario when asked.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.acceptance import NO_PREFIX_CACHE, api_checks, checks
from bench.bounds import derive, measure, with_fractions
from bench.overhead import api_cost_of_runs
from bench.workload import Job, Run, make_prompts, shared_prefix, with_prefix

if TYPE_CHECKING:
    from bench.local import LocalModel
    from bench.procs import Fleet

ALL_MODES = ("sequential", "gradio-concurrency", "static-batch", "transformers-serve", "farm-dynamic",
             "farm-continuous")
OPTIONAL_MODES = ("farm-openai",)
"""Run only when named in ``--modes``: ``farm-openai`` (the continuous farm behind ``farm api``,
driven by the ``openai`` SDK client code of ``transformers-serve``)."""
PREFIX_MODES = ("static-batch", "transformers-serve", "farm-dynamic", "farm-continuous", "farm-openai",
                NO_PREFIX_CACHE)
"""The modes of the shared-prefix scenario (unbatched ``gradio-concurrency`` left out: no target
names it and 16 threads of 500-token prompts take minutes)."""
PREFIX_CACHE_OFF = {"FARM_PREFIX_CACHE_MB": "0"}  # the engine's switch (worker/engine/prefix_cache.py)
"""The worker setting of ``farm-no-prefix-cache``: the continuous farm with its prefix cache off."""
PROMPT_TOKENS = 512
"""Room for the longest prompt in the farm's batch token budget (the prompts are 10-50 tokens)."""

Serve = Callable[[list[Job], int], Run]


@dataclass(frozen=True)
class Plan:
    """What every model of the run goes through (the command line)."""

    modes: list[str]
    levels: list[int]
    threads: int
    requests: int = 0
    new_tokens: int = 64
    mixed: int = 16
    mixed_requests: int = 32
    short_tokens: int = 16
    long_tokens: int = 256
    shared_prefix: int = 0
    profile_step: bool = False

    @property
    def target_level(self) -> int:
        return 16 if 16 in self.levels else max(self.levels)

    def requests_at(self, level: int) -> int:
        return self.requests or max(16, min(2 * level, 64))


class ProgressLog:
    """Reports each run as it ends, on stderr and in ``logs/progress.jsonl`` (a long run that is
    stopped early keeps what it measured)."""

    def __init__(self, out: Path) -> None:
        self.logdir = out / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.progress = self.logdir / "progress.jsonl"
        self.progress.write_text("")
        self.label = ""

    def __call__(self, run: Run, scenario: str = "") -> Run:
        summary = run.summary()
        text = summary.get("unavailable") or (f"{summary['tokens_per_s']} tok/s, p50 {summary.get('latency_p50')} s, "
                                              f"TTFT p50 {summary.get('ttft_p50')} s")
        where = f"{self.label} {scenario}".strip()
        print(f"bench: {where}: {run.mode} N={run.concurrency}: {text}", file=sys.stderr, flush=True)
        with self.progress.open("a") as progress:
            progress.write(json.dumps({"model": self.label, "scenario": scenario or "main", **summary,
                                       "loadavg": os.getloadavg()}) + "\n")
        return run


def run_model(plan: Plan, label: str, model: str, log: ProgressLog, out: Path) -> dict[str, Any]:
    """Every mode of ``plan`` on ``model``; the model's record (``label`` names its files)."""
    import torch

    from bench.local import LocalModel

    torch.set_num_threads(plan.threads)
    log.label = label
    started, load_before = time.time(), os.getloadavg()
    machine = measure(plan.threads)
    print(f"bench: {label}: copy {machine.copy_gb_s} GB/s, fp32 matmul {machine.matmul_gflop_s} GFLOP/s "
          f"on {plan.threads} thread(s)", file=sys.stderr, flush=True)
    step = _profile(plan, label, model, machine, out)
    prompts = make_prompts(min(32, max(plan.requests_at(c) for c in plan.levels)))
    with contextlib.ExitStack() as stack:
        local = LocalModel(model)
        prefix = _prefix(plan, local)
        servers = _start(stack, plan, model, local, log.logdir / label, prefix[1])
        runs, reference = _main_runs(plan, servers, local, prompts, log)
        mixed = _mixed_runs(plan, servers, prompts, log)
        prefix_runs, prefix_reference = (_prefix_runs(plan, servers, local, with_prefix(prefix[0], prompts), log)
                                         if prefix[0] else ([], {}))
        params = sum(p.numel() for p in local.model.parameters())
    bounds = derive(machine, params)
    rows = with_fractions([_checked(run, reference) for run in runs], bounds)
    prefix_rows = with_fractions([_checked(run, prefix_reference) for run in prefix_runs], bounds)
    mixed_rows = _agreeing([run for run in mixed if not run.unavailable])
    api_cost = api_cost_of_runs(runs)
    from bench.report import targets
    from protocol.settings import FarmSettings

    return {"label": label, "model": model, "model_name": FarmSettings(model=model).served_model_name(),
            "params": params, "machine": machine.__dict__, "bounds": bounds.to_dict(), "step": step,
            "new_tokens": plan.new_tokens, "concurrency": plan.levels, "threads": plan.threads,
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "started_at": started, "seconds": round(time.time() - started, 1),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "results": rows, "mixed": mixed_rows,
            "shared_prefix": {"tokens": prefix[1], "concurrency": plan.target_level, "results": prefix_rows}
            if prefix[0] else None,
            "targets": targets(rows, mixed_rows, plan.target_level),
            "acceptance": [c.to_dict() for c in checks(rows, label, prefix_rows if prefix[0] else None, step)],
            "api_cost": api_cost,
            "api_acceptance": [c.to_dict() for c in api_checks(rows, api_cost)] if "farm-openai" in plan.modes else [],
            "samples": _samples(runs, mixed, prefix_runs)}


def _profile(plan: Plan, label: str, model: str, machine: Any, out: Path) -> dict[str, Any] | None:
    if not plan.profile_step:
        return None
    from bench.profile_step import profile, summary_line

    step = profile(model, plan.threads, machine, out, label)
    gc.collect()  # the profiled model's weights, before the servers load theirs
    print(f"bench: {summary_line(label, step)}", file=sys.stderr, flush=True)
    return step


def _prefix(plan: Plan, local: LocalModel) -> tuple[str, int]:
    """The shared prefix of ``--shared-prefix`` in this model's tokens, and its token count."""
    if not plan.shared_prefix:
        return "", 0

    def count(text: str) -> int:
        return len(local.tokenizer(text, add_special_tokens=False)["input_ids"])
    text = shared_prefix(plan.shared_prefix, count)
    return text, count(text)


def _jobs(prompts: list[str], count: int, new_tokens: int) -> list[Job]:
    return [Job(i % len(prompts), prompts[i % len(prompts)], new_tokens) for i in range(count)]


def _mixed_jobs(prompts: list[str], count: int, short: int, long: int) -> list[Job]:
    # Long and short alternate, so every batch the dynamic strategy forms holds both.
    return [Job(i % len(prompts), prompts[i % len(prompts)], long if i % 2 == 0 else short,
                "long" if i % 2 == 0 else "short") for i in range(count)]


def _reference(plan: Plan, local: LocalModel, prompts: list[str], log: ProgressLog,
               scenario: str = "") -> tuple[Run, dict[int, str]]:
    """Every prompt once, alone (also the ``sequential`` mode's run)."""
    from bench.local import run_sequential

    seq = log(run_sequential(local, _jobs(prompts, len(prompts), plan.new_tokens)), scenario)
    return seq, {s.index: s.text for s in seq.samples}


def _main_runs(plan: Plan, servers: dict[str, Serve], local: LocalModel, prompts: list[str],
               log: ProgressLog) -> tuple[list[Run], dict[int, str]]:
    from bench.local import run_sequential

    seq, reference = _reference(plan, local, prompts, log)
    runs = [seq] if "sequential" in plan.modes and 1 not in plan.levels else []
    # Modes alternate within each level, so a change in the machine's load hits them alike.
    for c in plan.levels:
        jobs = _jobs(prompts, plan.requests_at(c), plan.new_tokens)
        chosen = {mode: serve for mode, serve in servers.items() if mode in plan.modes}
        if c == 1:
            if "sequential" in plan.modes:
                chosen = {"sequential": lambda jobs, _: run_sequential(local, jobs), **chosen}
            runs += [log(run) for run in take_turns(chosen, jobs)]
        else:
            runs += [log(serve(jobs, c)) for serve in chosen.values()]
    return runs, reference


def _mixed_runs(plan: Plan, servers: dict[str, Serve], prompts: list[str], log: ProgressLog) -> list[Run]:
    if not plan.mixed:
        return []
    jobs = _mixed_jobs(prompts, plan.mixed_requests, plan.short_tokens, plan.long_tokens)
    return [log(serve(jobs, plan.mixed), "mixed") for mode, serve in servers.items()
            if mode in ("farm-dynamic", "farm-continuous")]


def _prefix_runs(plan: Plan, servers: dict[str, Serve], local: LocalModel, prompts: list[str],
                 log: ProgressLog) -> tuple[list[Run], dict[int, str]]:
    """The shared-prefix scenario at the target level; its reference is ``sequential`` on the
    same prompts."""
    seq, reference = _reference(plan, local, prompts, log, "shared-prefix")
    level = plan.target_level
    jobs = _jobs(prompts, plan.requests_at(level), plan.new_tokens)
    runs = [seq] + [log(serve(jobs, level), "shared-prefix") for mode, serve in servers.items()
                    if mode in PREFIX_MODES and (mode in plan.modes or mode == NO_PREFIX_CACHE)]
    return runs, reference


def take_turns(servers: dict[str, Serve], jobs: list[Job]) -> list[Run]:
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


def _start(stack: contextlib.ExitStack, plan: Plan, model: str, local: LocalModel, logdir: Path,
           prefix_tokens: int) -> dict[str, Serve]:
    """Start every server once; each mode as ``serve(jobs, concurrency)``, the other modes'
    processes stopped while it runs N > 1 clients (``bench.procs.Fleet``)."""
    from bench.local import run_gradio, run_static
    from bench.procs import Fleet

    fleet = Fleet()
    servers: dict[str, Serve] = {
        "gradio-concurrency": lambda jobs, c: run_gradio(local, jobs, c),
        "static-batch": lambda jobs, c: run_static(local, jobs, c),
    }
    clients = max(max(plan.levels), plan.mixed)
    new_tokens = max(plan.new_tokens, plan.long_tokens)
    if "transformers-serve" in plan.modes:
        servers["transformers-serve"] = _start_serve(stack, fleet, model, plan, prefix_tokens, logdir)
    for strategy in ("dynamic", "continuous"):
        if f"farm-{strategy}" in plan.modes:
            servers[f"farm-{strategy}"] = _start_farm(stack, fleet, f"farm-{strategy}", functools.partial(
                _farm, model, strategy, plan, clients, new_tokens, logdir, prefix_tokens))
    if prefix_tokens and "farm-continuous" in plan.modes:
        servers[NO_PREFIX_CACHE] = _start_farm(stack, fleet, NO_PREFIX_CACHE, functools.partial(
            _farm, model, "continuous", plan, clients, new_tokens, logdir, prefix_tokens, PREFIX_CACHE_OFF,
            "continuous-no-prefix-cache"))
    if "farm-openai" in plan.modes:
        servers["farm-openai"] = _start_openai(stack, fleet, model, plan, clients, new_tokens, logdir, prefix_tokens)
    return {mode: fleet.serve(mode, serve) for mode, serve in servers.items()}


def _unavailable(mode: str, reason: str) -> Serve:
    return lambda jobs, c: Run(mode, c, unavailable=reason)


def _start_serve(stack: contextlib.ExitStack, fleet: Fleet, model: str, plan: Plan, prefix_tokens: int,
                 logdir: Path) -> Serve:
    from bench.serve import ServeServer, run_serve, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return _unavailable("transformers-serve", reason)
    try:
        server = ServeServer(model, plan.threads, max(plan.levels), max(plan.new_tokens, 64) + 128 + prefix_tokens,
                             logdir)
    except RuntimeError as error:
        return _unavailable("transformers-serve", str(error))
    stack.callback(server.close)
    fleet.add("transformers-serve", [server.process])
    return lambda jobs, c: run_serve(server, jobs, c)


def _farm(model: str, strategy: str, plan: Plan, clients: int, new_tokens: int, logdir: Path, prefix_tokens: int,
          extra_env: dict[str, str] | None = None, tag: str = "") -> Any:
    from bench.farm import FarmUnderTest

    return FarmUnderTest(model, strategy, plan.threads, clients, new_tokens, logdir, PROMPT_TOKENS + prefix_tokens,
                         extra_env, tag)


def _start_farm(stack: contextlib.ExitStack, fleet: Fleet, mode: str, start: Callable[[], Any]) -> Serve:
    from bench.farm import run_farm

    try:
        farm = start()
    except RuntimeError as error:
        return _unavailable(mode, str(error))
    stack.callback(farm.close)
    fleet.add(mode, [farm.worker], farm.ready)
    return lambda jobs, c: run_farm(farm, jobs, c, mode)


def _start_openai(stack: contextlib.ExitStack, fleet: Fleet, model: str, plan: Plan, clients: int, new_tokens: int,
                  logdir: Path, prefix_tokens: int) -> Serve:
    from bench.api import FarmOpenAI, run_openai

    try:
        farm = _farm(model, "continuous", plan, clients, new_tokens, logdir / "openai", prefix_tokens)
        stack.callback(farm.close)
        server = FarmOpenAI(farm.url, model, logdir / "openai", clients)
    except RuntimeError as error:
        return _unavailable("farm-openai", str(error))
    stack.callback(server.close)
    fleet.add("farm-openai", [farm.worker, server.api.process], farm.ready)
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


def _samples(runs: list[Run], mixed: list[Run], prefix: list[Run]) -> dict[str, Any]:
    return {**{f"{r.mode}@{r.concurrency}": [s.__dict__ for s in r.samples] for r in runs},
            **{f"mixed:{r.mode}@{r.concurrency}": [s.__dict__ for s in r.samples] for r in mixed},
            **{f"shared-prefix:{r.mode}@{r.concurrency}": [s.__dict__ for s in r.samples] for r in prefix}}
