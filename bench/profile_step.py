"""``python -m bench.profile_step`` / ``farm bench --profile-step``: one 16-row decode step of each
model through the worker's own engine code, timed against the machine's bandwidth bound, and a
``torch.profiler`` breakdown of where the step goes.

The model is loaded as a worker loads it (``worker.model.load_model``: fp32, oneDNN-packed
weights unless ``FARM_CPU_PREPACK=0``, the decode-attention kernel unless
``FARM_CPU_DECODE_ATTENTION=0``), 16 rows join a continuous batch
(``worker.engine.kv_slab.ContinuousBatch``: one prefill), and each timed step is the engine's
``step``: the forward pass, per-row sampling and each row's text delta (no Redis: the stream
writes are not part of it). The median of the timed steps is reported, its tokens per second as a
fraction of the batch-16 bandwidth bound (``bench.bounds``), and the top operators by self CPU
time go to ``profile-<model>.txt``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.bounds import BATCH, Machine, derive, measure
from bench.workload import make_prompts

WARMUP_STEPS = 4
TIMED_STEPS = 16
PROFILED_STEPS = 8
TOP_OPERATORS = 25
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise",
              "aten::mkldnn_linear", "aten::_mkl_linear")
"""Operators that are the matmuls of a step (their self time is the weight streaming)."""


def operator_shares(self_times: dict[str, float]) -> dict[str, float]:
    """Self CPU time (any unit) by operator name -> the shares of matmul, attention and the rest."""
    total = sum(self_times.values())
    if total <= 0:
        return {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    matmul = sum(t for name, t in self_times.items() if name in MATMUL_OPS)
    attention = sum(t for name, t in self_times.items()
                    if name not in MATMUL_OPS and ("scaled_dot_product" in name or "attention" in name))
    return {"matmul": round(matmul / total, 4), "attention": round(attention / total, 4),
            "other": round((total - matmul - attention) / total, 4)}


def profile(path: str, threads: int, machine: Machine, out: Path, label: str, rows: int = BATCH) -> dict[str, Any]:
    """Time and profile ``rows``-row decode steps of the model at ``path``; returns the figures.
    Off the main thread, as the worker's engine runs its model on a thread of its own."""
    from worker.devices import on_own_thread

    return on_own_thread(lambda: _profile(path, threads, machine, out, label, rows))


def _profile(path: str, threads: int, machine: Machine, out: Path, label: str, rows: int) -> dict[str, Any]:
    import torch

    from protocol.schema import GenerationRequest
    from protocol.settings import FarmSettings
    from worker.engine.kv_slab import ContinuousBatch
    from worker.engine.model_runner import ModelRunner, configure_torch_threads
    from worker.engine.runner import Quiet
    from worker.model import load_model

    # The worker's own FARM_* settings (FARM_CPU_PREPACK, FARM_CPU_DECODE_ATTENTION...), this model fp32.
    settings = FarmSettings.from_env(model=path, dtype="float32", quant="none", adapter="", adapters="",
                                     torch_threads=threads)
    configure_torch_threads(threads, "cpu")
    loaded = load_model(settings, "cpu")
    runner = ModelRunner(loaded)
    batch = ContinuousBatch(runner)
    quiet = Quiet()
    steps = WARMUP_STEPS + TIMED_STEPS + PROFILED_STEPS + 1
    request_rows = [runner.new_row(f"step-{i}", runner.encode(prompt), GenerationRequest(
        prompt=prompt, max_new_tokens=steps + 1, ignore_eos=True)) for i, prompt in enumerate(make_prompts(rows))]
    batch.join(request_rows, quiet)
    for _ in range(WARMUP_STEPS):
        batch.step(quiet)
    times = []
    for _ in range(TIMED_STEPS):
        started = time.perf_counter()
        batch.step(quiet)
        times.append(time.perf_counter() - started)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILED_STEPS):
            batch.step(quiet)
    params = sum(p.numel() for p in loaded.model.parameters())
    result = _figures(statistics.median(times), rows, derive(machine, params), loaded.packed_layers)
    result["operators"] = operator_shares({e.key: e.self_cpu_time_total for e in prof.key_averages()})
    result["profile_file"] = str(_write_profile(out, label, result, prof))
    batch.drop()
    return result


def _figures(step_s: float, rows: int, bounds: Any, packed: int) -> dict[str, Any]:
    tokens_per_s = rows / step_s
    return {"rows": rows, "step_ms": round(step_s * 1000, 2), "tokens_per_s": round(tokens_per_s, 1),
            "of_batch16_bw": round(tokens_per_s / bounds.batch16_tok_s, 4),
            "of_compute": round(tokens_per_s / bounds.compute_tok_s, 4), "packed_layers": packed,
            "bounds": bounds.to_dict()}


def _write_profile(out: Path, label: str, result: dict[str, Any], prof: Any) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile-{label}.txt"
    shares = result["operators"]
    head = (f"{label}: {result['rows']}-row decode step {result['step_ms']} ms (median of {TIMED_STEPS}), "
            f"{result['tokens_per_s']} tok/s = {result['of_batch16_bw']:.0%} of the batch-16 bandwidth bound "
            f"({result['bounds']['batch16_tok_s']} tok/s); self CPU time over {PROFILED_STEPS} steps: "
            f"matmul {shares['matmul']:.0%}, attention {shares['attention']:.0%}, other {shares['other']:.0%}\n\n")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=TOP_OPERATORS)
    path.write_text(head + table + "\n")
    return path


def summary_line(label: str, result: dict[str, Any]) -> str:
    shares = result["operators"]
    return (f"{label}: {result['rows']}-row step {result['step_ms']} ms, {result['tokens_per_s']} tok/s, "
            f"{result['of_batch16_bw']:.0%} of the bandwidth bound; matmul {shares['matmul']:.0%}, "
            f"attention {shares['attention']:.0%}, other {shares['other']:.0%} ({result['profile_file']})")


def main(argv: list[str] | None = None) -> int:
    from bench.shapes import DEFAULT_SWEEP, parse_models, resolve
    from protocol.settings import project_root

    parser = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_SWEEP, help="comma-separated shapes or model directories")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: every usable core)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    try:
        entries = parse_models(args.models)
    except ValueError as error:
        parser.error(str(error))
    threads = args.threads or len(os.sched_getaffinity(0))
    for entry in entries:
        machine = measure(threads)
        result = profile(resolve(entry, project_root()), threads, machine, args.out, entry.label)
        print(summary_line(entry.label, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
