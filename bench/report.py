"""Benchmark output: the tables, the JSON record, the PNG plot, the targets of issue 6 and the
per-model text of a sweep (bounds, decode step, issue 17's checks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.acceptance import Check, checks_table, checks_text, find_row
from bench.overhead import api_cost_text

COLUMNS = [("mode", "mode", "{}"), ("concurrency", "N", "{}"), ("requests", "req", "{}"),
           ("tokens_per_s", "tok/s", "{:.1f}"), ("requests_per_s", "req/s", "{:.2f}"),
           ("latency_p50", "p50 s", "{:.2f}"), ("latency_p95", "p95 s", "{:.2f}"),
           ("ttft_p50", "TTFT p50 s", "{:.3f}"), ("overhead_ms_p50", "overhead ms", "{:.1f}"),
           ("ttft_overhead_ms_p50", "TTFT overhead ms", "{:.1f}"), ("identical", "= seq", "{}"),
           ("of_batch1_bw", "of bw b1", "{:.0%}"), ("of_batch16_bw", "of bw b16", "{:.0%}"),
           ("of_compute", "of compute", "{:.0%}")]
"""``overhead ms``: a farm mode's median delivery overhead, latency minus the worker's generate
time (``bench.overhead``; the same for TTFT). The last three: tok/s as a fraction of the model's
batch-1 and batch-16 bandwidth bounds and of its compute bound (``bench.bounds``)."""


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the runs (also readable in a terminal)."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        if row.get("unavailable"):
            lines.append(f"| {row['mode']} | {row['concurrency']} | unavailable: {row['unavailable']} |")
            continue
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def mixed_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| strategy | N | req | tok/s | short p50 s | short p95 s | long p50 s | outputs agree |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [_cell(row.get(key), fmt) for key, fmt in (
            ("tokens_per_s", "{:.1f}"), ("short_latency_p50", "{:.2f}"), ("short_latency_p95", "{:.2f}"),
            ("long_latency_p50", "{:.2f}"))]
        lines.append(f"| {row['mode']} | {row['concurrency']} | {row['requests']} | " + " | ".join(cells)
                     + f" | {row.get('identical', '')} |")
    return "\n".join(lines)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def targets(rows: list[dict[str, Any]], mixed: list[dict[str, Any]], at: int = 16) -> list[dict[str, Any]]:
    """Issue 6's targets as measured ratios (``None`` where a mode did not run)."""
    farms = [r for r in rows if r["mode"].startswith("farm") and r["concurrency"] == at and not r.get("unavailable")]
    best = max(farms, key=lambda r: r["tokens_per_s"], default=None)
    out = []
    for peer, minimum in (("transformers-serve", 1.0), ("static-batch", 1.0), ("gradio-concurrency", 5.0)):
        other = find_row(rows, peer, at)
        ratio = best["tokens_per_s"] / other["tokens_per_s"] if best and other and other["tokens_per_s"] else None
        met = ratio is not None and ratio >= minimum
        mode = best["mode"] if best else None
        out.append(_target(f"farm tok/s at N={at} vs {peer}", ratio, f">= {minimum}", met, mode))
    out.append(_latency_target(rows))
    out.append(_mixed_target(mixed))
    same = all(r.get("identical_all", True) for r in rows + mixed)
    out.append(_target("greedy outputs identical to sequential (fp32)", None, "all", same, None))
    return out


def _latency_target(rows: list[dict[str, Any]]) -> dict[str, Any]:
    seq = find_row(rows, "sequential", 1)
    farms = [r for r in rows if r["mode"].startswith("farm") and r["concurrency"] == 1 and not r.get("unavailable")]
    best = min(farms, key=lambda r: r["latency_p50"], default=None)
    if not seq or not best:
        return _target("farm p50 latency at N=1 vs sequential", None, "<= 1.1x + 20 ms", False, None)
    limit = 1.1 * seq["latency_p50"] + 0.02
    return _target("farm p50 latency at N=1 vs sequential", best["latency_p50"] / seq["latency_p50"],
                   f"<= {limit:.3f} s (1.1x + 20 ms)", best["latency_p50"] <= limit, best["mode"])


def _mixed_target(mixed: list[dict[str, Any]]) -> dict[str, Any]:
    dyn = next((r for r in mixed if r["mode"] == "farm-dynamic"), None)
    cont = next((r for r in mixed if r["mode"] == "farm-continuous"), None)
    if not dyn or not cont or not dyn.get("short_latency_p50"):
        return _target("short-request p50, continuous vs dynamic (16/256 mix)", None, "<= 0.5", False, None)
    ratio = cont["short_latency_p50"] / dyn["short_latency_p50"]
    return _target("short-request p50, continuous vs dynamic (16/256 mix)", ratio, "<= 0.5", ratio <= 0.5, None)


def _target(name: str, value: float | None, goal: str, met: bool, mode: str | None) -> dict[str, Any]:
    return {"target": name, "value": None if value is None else round(value, 3), "goal": goal, "met": met,
            "mode": mode}


def targets_table(items: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for t in items:
        value = "–" if t["value"] is None else f"{t['value']:.2f}x" + (f" ({t['mode']})" if t["mode"] else "")
        lines.append(f"| {t['target']} | {value} | {t['goal']} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines)


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(record, indent=2))


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Throughput and p50 latency against concurrency, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        points = sorted((r["concurrency"], r["tokens_per_s"], r["latency_p50"]) for r in rows
                        if r["mode"] == mode and not r.get("unavailable"))
        if not points:
            continue
        xs, tps, lat = zip(*points, strict=True)
        style = "--" if len(points) == 1 else "-"
        if len(points) == 1:  # sequential has no concurrency: draw it as a level
            xs, tps, lat = _level(rows, xs, tps, lat)
        left.plot(xs, tps, style, marker="o", label=mode)
        right.plot(xs, lat, style, marker="o", label=mode)
    levels = sorted({r["concurrency"] for r in rows})
    for axis, label in ((left, "tokens / s"), (right, "p50 latency (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _level(rows: list[dict[str, Any]], xs: tuple[Any, ...], tps: tuple[Any, ...],
           lat: tuple[Any, ...]) -> tuple[list[Any], list[Any], list[Any]]:
    levels = sorted({r["concurrency"] for r in rows}) or list(xs)
    return levels, [tps[0]] * len(levels), [lat[0]] * len(levels)


def bounds_text(record: dict[str, Any]) -> str:
    """The machine's measurements and the model's bounds, in one paragraph."""
    m, b = record["machine"], record["bounds"]
    cpu = f" of {m['cpu']}" if m.get("cpu") else ""
    return (f"Machine: copy {m['copy_gb_s']} GB/s, fp32 2048x2048 matmul {m['matmul_gflop_s']} GFLOP/s on "
            f"{m['threads']} thread(s){cpu}. {record['label']}: {b['params'] / 1e6:.1f}M parameters, "
            f"{b['weight_bytes'] / 1e6:.0f} MB of weights; bandwidth-bound {b['batch1_tok_s']:.1f} tok/s at batch 1, "
            f"{b['batch16_tok_s']:.0f} at batch 16; compute-bound {b['compute_tok_s']:.0f} tok/s.")


def step_text(step: dict[str, Any] | None) -> str:
    if not step:
        return ""
    ops, bounds = step["operators"], step["bounds"]
    lower = " (the lower bound here: no step goes faster)" if bounds["compute_tok_s"] < bounds["batch16_tok_s"] else ""
    return (f"Decode step of {step['rows']} rows (engine code): {step['step_ms']} ms, {step['tokens_per_s']} tok/s "
            f"= {step['of_batch16_bw']:.0%} of the batch-16 bandwidth bound and {step['of_compute']:.0%} of the "
            f"compute bound{lower}; self CPU time: matmul "
            f"{ops['matmul']:.0%}, attention {ops['attention']:.0%}, other {ops['other']:.0%} "
            f"(top operators: {step['profile_file']}).")


def model_text(record: dict[str, Any]) -> str:
    """One model's markdown: bounds, runs, scenarios, issue 6's targets and issue 17's checks."""
    prefix = record.get("shared_prefix")
    parts = [f"## {record['label']} ({record['model']})", bounds_text(record), step_text(record.get("step")),
             table(record["results"]), mixed_table(record["mixed"]) if record["mixed"] else "",
             (f"Shared prefix of {prefix['tokens']} tokens, N={prefix['concurrency']}:\n\n" + table(prefix["results"]))
             if prefix else "",
             targets_table(record["targets"]),
             checks_table(record["label"], [Check(**c) for c in record["acceptance"]]),
             api_cost_text(record.get("api_cost")),
             ("Issue 15 (farm api):\n\n" + checks_table(record["label"], [Check(**c) for c in api]))
             if (api := record.get("api_acceptance")) else ""]
    return "\n\n".join(part for part in parts if part)


def sweep_text(records: list[dict[str, Any]]) -> str:
    """Issue 17's checks of every model, one line each, and how many passed; then issue 15's
    where ``farm-openai`` ran."""
    lines = [checks_text(r["label"], [Check(**c) for c in r["acceptance"]]) for r in records]
    every = [c["status"] for r in records for c in r["acceptance"]]
    counts = ", ".join(f"{every.count(s)} {s}" for s in ("PASS", "FAIL", "N/A", "INFO") if s in every)
    api = [checks_text(r["label"], [Check(**c) for c in r["api_acceptance"]]) for r in records
           if r.get("api_acceptance")]
    text = "\n".join(lines) + f"\n\nissue 17 targets over {len(records)} model(s): {counts}"
    return text + ("\n\nissue 15 (farm api):\n" + "\n".join(api) if api else "")
