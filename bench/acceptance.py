"""Issue 17's acceptance targets, checked on one model's rows (pure: rows in, checks out), and
issue 15's (``farm api``: ``api_checks``).

Each check is PASS or FAIL, or N/A when the run did not measure it (a mode or concurrency level
left out, ``--shared-prefix`` or ``--profile-step`` not given); N/A never counts as met.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

FARM = "farm-continuous"
NO_PREFIX_CACHE = "farm-no-prefix-cache"
OPENAI = "farm-openai"
API_COST_LIMIT_MS = 10.0
"""Issue 15: at one client, ``farm-openai`` within 10 ms of ``farm-continuous`` (the API's own cost)."""
STEP_TARGET_SHAPE = "bench"
"""The decode-step target is the issue's on the bench model; other models print the fraction."""


@dataclass(frozen=True)
class Check:
    target: str
    goal: str
    value: str
    status: str
    """``PASS``, ``FAIL``, ``N/A`` or ``INFO`` (a figure the issue sets no goal for on this model)."""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def find_row(rows: list[dict[str, Any]], mode: str, concurrency: int) -> dict[str, Any] | None:
    """The measured row of ``mode`` at ``concurrency`` clients, if it ran."""
    for row in rows:
        if row["mode"] == mode and row["concurrency"] == concurrency and not row.get("unavailable"):
            return row
    return None


def _ratio_check(target: str, rows: list[dict[str, Any]], key: str, level: int, peer: str, limit: float,
                 at_least: bool, mode: str = FARM) -> Check:
    """``mode``'s ``key`` over ``peer``'s at ``level``, against ``limit`` (a floor or a ceiling)."""
    goal = f"{'>=' if at_least else '<='} {limit:g}x"
    ours, theirs = find_row(rows, mode, level), find_row(rows, peer, level)
    if ours is None or theirs is None or not ours.get(key) or not theirs.get(key):
        missing = mode if ours is None or not ours.get(key) else peer
        return Check(target, goal, f"{missing} at N={level} not measured", "N/A")
    ratio = ours[key] / theirs[key]
    met = ratio >= limit if at_least else ratio <= limit
    return Check(target, goal, f"{ratio:.2f}x ({ours[key]:g} vs {theirs[key]:g})", "PASS" if met else "FAIL")


def _latency_vs_sequential(rows: list[dict[str, Any]]) -> Check:
    target, goal = f"{FARM} p50 latency at N=1 vs sequential", "<= 1.05x + 20 ms"
    ours, seq = find_row(rows, FARM, 1), find_row(rows, "sequential", 1)
    if ours is None or seq is None or ours.get("latency_p50") is None or seq.get("latency_p50") is None:
        return Check(target, goal, f"{FARM} or sequential at N=1 not measured", "N/A")
    limit = 1.05 * seq["latency_p50"] + 0.02
    value = f"{ours['latency_p50']:.3f} s vs limit {limit:.3f} s ({ours['latency_p50'] / seq['latency_p50']:.2f}x)"
    return Check(target, goal, value, "PASS" if ours["latency_p50"] <= limit else "FAIL")


def _identical(rows: list[dict[str, Any]]) -> Check:
    measured = [r for r in rows if "identical_all" in r]
    if not measured:
        return Check("greedy outputs identical to sequential (fp32)", "every mode", "nothing measured", "N/A")
    differing = [f"{r['mode']}@{r['concurrency']} {r['identical']}" for r in measured if not r["identical_all"]]
    return Check("greedy outputs identical to sequential (fp32)", "every mode",
                 "differ: " + ", ".join(differing) if differing else f"{len(measured)} runs agree",
                 "FAIL" if differing else "PASS")


def _step_check(step: dict[str, Any] | None, shape: str) -> Check:
    target, goal = "16-row decode step vs the batch-16 bandwidth bound", ">= 50%"
    if not step:
        return Check(target, goal, "not profiled (--profile-step)", "N/A")
    fraction = step["of_batch16_bw"]
    value = f"{fraction:.0%} ({step['step_ms']:.1f} ms per step)"
    if shape != STEP_TARGET_SHAPE:
        return Check(target, f"{goal} (the issue's goal is on the bench model)", value, "INFO")
    return Check(target, goal, value, "PASS" if fraction >= 0.5 else "FAIL")


def checks(rows: list[dict[str, Any]], shape: str, prefix_rows: list[dict[str, Any]] | None = None,
           step: dict[str, Any] | None = None) -> list[Check]:
    """Every target of issue 17 on one model: ``rows`` of the main runs, ``prefix_rows`` of the
    ``--shared-prefix`` runs (``None``: not run), ``step`` the decode-step profile."""
    out = [
        _ratio_check(f"{FARM} tok/s at N=16 vs transformers-serve", rows, "tokens_per_s", 16,
                     "transformers-serve", 1.3, True),
        _ratio_check(f"{FARM} tok/s at N=16 vs static-batch", rows, "tokens_per_s", 16, "static-batch", 1.3, True),
        _ratio_check(f"{FARM} p50 latency at N=1 vs transformers-serve", rows, "latency_p50", 1,
                     "transformers-serve", 1.0, False),
        _latency_vs_sequential(rows),
        _ratio_check(f"{FARM} tok/s at N=64 vs transformers-serve", rows, "tokens_per_s", 64,
                     "transformers-serve", 1.5, True),
    ]
    if prefix_rows is None:
        na = "run with --shared-prefix 512"
        out += [Check(f"shared prefix: {FARM} TTFT p50 at N=16 vs without the prefix cache", "<= 0.5x", na, "N/A"),
                Check(f"shared prefix: {FARM} TTFT p50 at N=16 vs transformers-serve", "<= 1x", na, "N/A")]
    else:
        out += [_ratio_check(f"shared prefix: {FARM} TTFT p50 at N=16 vs without the prefix cache", prefix_rows,
                             "ttft_p50", 16, NO_PREFIX_CACHE, 0.5, False),
                _ratio_check(f"shared prefix: {FARM} TTFT p50 at N=16 vs transformers-serve", prefix_rows,
                             "ttft_p50", 16, "transformers-serve", 1.0, False)]
    out.append(_step_check(step, shape))
    out.append(_identical(rows + (prefix_rows or [])))
    return out


def _api_cost_check(cost: dict[str, Any] | None) -> Check:
    """The API's own cost (``bench.overhead.api_cost``): paired delivery overheads, not raw p50s,
    which carry the model's drift; the raw p50 difference is shown beside it."""
    target, goal = f"{OPENAI} API's own cost at N=1 vs {FARM} (paired delivery overhead)", \
        f"<= {API_COST_LIMIT_MS:g} ms"
    if not cost or cost.get("latency_ms") is None:
        return Check(target, goal, f"{OPENAI} and {FARM} at N=1 not both measured with the farm's times", "N/A")
    value = (f"{cost['latency_ms']:.1f} ms over {cost['pairs']} pairs (TTFT {_ms(cost.get('ttft_ms'))}; "
             f"raw p50 difference {_ms(cost.get('raw_p50_diff_ms'))})")
    return Check(target, goal, value, "PASS" if cost["latency_ms"] <= API_COST_LIMIT_MS else "FAIL")


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} ms"


def api_checks(rows: list[dict[str, Any]], cost: dict[str, Any] | None) -> list[Check]:
    """Issue 15's bench targets: ``farm-openai`` throughput at 16 clients against
    ``transformers-serve``, and the API's own cost at one client."""
    return [_ratio_check(f"{OPENAI} tok/s at N=16 vs transformers-serve", rows, "tokens_per_s", 16,
                         "transformers-serve", 1.2, True, OPENAI),
            _api_cost_check(cost)]


def checks_text(label: str, items: list[Check]) -> str:
    """One line per target: ``PASS  model  target  value  (goal)``."""
    width = max(len(c.target) for c in items)
    return "\n".join(f"{c.status:<4}  {label}  {c.target:<{width}}  {c.value}  (goal {c.goal})" for c in items)


def checks_table(label: str, items: list[Check]) -> str:
    lines = ["| model | target | measured | goal | result |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {c.target} | {c.value} | {c.goal} | {c.status} |" for c in items]
    return "\n".join(lines)
