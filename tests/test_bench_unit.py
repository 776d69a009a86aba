"""``farm bench``'s pure parts: the shape table, ``--models`` and the options, the bounds
arithmetic, issue 17's target checks, the shared prefix and the step profile's operator shares.
No torch, no timing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import _entries, _parser, _plan
from bench.acceptance import NO_PREFIX_CACHE, checks, checks_text
from bench.bounds import Machine, derive, fractions, with_fractions
from bench.profile_step import operator_shares
from bench.report import sweep_text
from bench.shapes import DEFAULT_SWEEP, SHAPES, parse_models, shape_dir
from bench.workload import shared_prefix, with_prefix
from ops.model_specs import SPECS


def test_shape_table_names_the_sweep_and_its_sizes() -> None:
    assert DEFAULT_SWEEP.split(",") == list(SHAPES) == ["bench", "llama32k", "demo"]
    assert {s.size for s in SHAPES.values()} <= set(SPECS) | {"demo"}
    assert shape_dir(Path("/r"), SHAPES["llama32k"]) == Path("/r/.farm/models/llama32k")


def test_llama32k_is_issue_17s_134m_llama() -> None:
    spec = SPECS["llama32k"]
    assert (spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.intermediate) == (768, 12, 12, 12, 2048)
    assert spec.model_vocab == 32000 and spec.vocab < spec.model_vocab  # rows past the tokenizer pad
    # What the built models hold (counted from their weights): untied embeddings, no biases.
    assert spec.params() == 134_105_856
    assert SPECS["bench"].params() == 97_536_768
    assert spec.params() - SPECS["bench"].params() == 2 * (32000 - 8192) * 768


def test_models_are_shapes_or_directories(tmp_path: Path) -> None:
    entries = parse_models(f" bench, {tmp_path} ,demo")
    assert [e.label for e in entries] == ["bench", tmp_path.name, "demo"]
    assert entries[0].shape == SHAPES["bench"] and entries[1].shape is None and entries[1].path == str(tmp_path)


@pytest.mark.parametrize(("text", "message"), [
    ("", "at least one model"),
    ("bench,nosuch", "'nosuch' is neither a known shape (bench, llama32k, demo) nor an existing model directory"),
    ("bench,demo,bench", "bench given twice"),
])
def test_bad_models_are_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="--models") as caught:
        parse_models(text)
    assert message in str(caught.value)


def _plan_of(*argv: str) -> Any:
    return _plan(_parser().parse_args(list(argv)))


def test_options_become_a_plan() -> None:
    plan = _plan_of("--models", "bench,demo", "--concurrency", "64,1,16", "--shared-prefix", "512", "--profile-step",
                    "--threads", "2", "--modes", "static-batch,farm-continuous")
    assert plan.levels == [1, 16, 64] and plan.target_level == 16 and plan.threads == 2
    assert plan.shared_prefix == 512 and plan.profile_step and plan.modes == ["static-batch", "farm-continuous"]
    assert [plan.requests_at(c) for c in (1, 16, 64)] == [16, 32, 64]
    assert _plan_of("--concurrency", "1,4").target_level == 4


@pytest.mark.parametrize(("argv", "message"), [
    (["--modes", "sequential,warp"], "--modes: unknown mode(s) warp"),
    (["--concurrency", "1,x"], "--concurrency: expected comma-separated client counts"),
    (["--concurrency", "0,4"], "--concurrency: every client count must be at least 1"),
    (["--shared-prefix", "-1"], "--shared-prefix must be at least 0"),
    (["--new-tokens", "0"], "--new-tokens must be at least 1"),
])
def test_bad_options_are_named(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        _plan_of(*argv)
    assert message in str(caught.value)


def test_one_model_keeps_the_bench_file_names(tmp_path: Path) -> None:
    (default, stem), = _entries(_parser().parse_args([]))
    assert default.shape == SHAPES["bench"] and stem == "bench"
    (given, stem), = _entries(_parser().parse_args(["--model", str(tmp_path)]))
    assert given.path == str(tmp_path) and given.shape is None and stem == "bench"
    swept = _entries(_parser().parse_args(["--models", f"llama32k,{tmp_path}"]))
    assert [stem for _, stem in swept] == ["llama32k", tmp_path.name]


def test_model_and_models_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--model", "x", "--models", "bench"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_bounds_of_issue_17s_figures() -> None:
    # The issue's machine (26 GB/s, 335 GFLOP/s) and model (536 MB): ~48, ~780 and ~1,250 tok/s.
    bounds = derive(Machine(copy_gb_s=26.0, matmul_gflop_s=335.0, threads=2), 134_105_856)
    assert bounds.weight_bytes == 536_423_424
    assert bounds.batch1_tok_s == pytest.approx(48.47, abs=0.01)
    assert bounds.batch16_tok_s == pytest.approx(16 * bounds.batch1_tok_s)
    assert bounds.compute_tok_s == pytest.approx(1249.0, abs=0.5)
    assert fractions(195.0, bounds) == {"of_batch1_bw": pytest.approx(4.0232, abs=1e-4),
                                        "of_batch16_bw": pytest.approx(0.2514, abs=1e-4),
                                        "of_compute": pytest.approx(0.1561, abs=1e-4)}
    assert derive(Machine(26.0, 335.0, 2), 100, bytes_per_param=2).weight_bytes == 200
    with pytest.raises(ValueError, match="params and bytes_per_param must be positive"):
        derive(Machine(26.0, 335.0, 2), 0)


def test_fractions_only_on_measured_rows() -> None:
    bounds = derive(Machine(26.0, 335.0, 2), 134_105_856)
    rows = with_fractions([{"mode": "a", "tokens_per_s": 97.0}, {"mode": "b", "unavailable": "no"}], bounds)
    assert rows[0]["of_batch1_bw"] == pytest.approx(2.0, abs=0.01) and "of_batch1_bw" not in rows[1]


def row(mode: str, n: int, tok_s: float = 100.0, p50: float = 1.0, ttft: float = 0.5,
        identical: bool = True) -> dict[str, Any]:
    return {"mode": mode, "concurrency": n, "tokens_per_s": tok_s, "latency_p50": p50, "ttft_p50": ttft,
            "identical": "4/4" if identical else "3/4", "identical_all": identical}


def by_target(items: list[Any]) -> dict[str, str]:
    return {c.target: c.status for c in items}


def test_targets_pass_and_fail_on_their_limits() -> None:
    rows = [row("sequential", 1, p50=2.0), row("transformers-serve", 1, p50=2.2), row("farm-continuous", 1, p50=2.12),
            row("transformers-serve", 16, 150.0), row("static-batch", 16, 160.0), row("farm-continuous", 16, 200.0),
            row("transformers-serve", 64, 100.0), row("farm-continuous", 64, 149.0)]
    status = by_target(checks(rows, "bench"))
    assert status["farm-continuous tok/s at N=16 vs transformers-serve"] == "PASS"  # 1.33x
    assert status["farm-continuous tok/s at N=16 vs static-batch"] == "FAIL"  # 1.25x
    assert status["farm-continuous p50 latency at N=1 vs transformers-serve"] == "PASS"
    assert status["farm-continuous p50 latency at N=1 vs sequential"] == "PASS"  # 2.12 <= 1.05 * 2 + 0.02
    assert status["farm-continuous tok/s at N=64 vs transformers-serve"] == "FAIL"  # 1.49x
    assert status["greedy outputs identical to sequential (fp32)"] == "PASS"
    rows[2] = row("farm-continuous", 1, p50=2.13)
    assert by_target(checks(rows, "bench"))["farm-continuous p50 latency at N=1 vs sequential"] == "FAIL"


def test_targets_not_measured_are_not_met() -> None:
    items = checks([row("sequential", 1), row("farm-continuous", 1, identical=False)], "demo")
    status = by_target(items)
    assert status["farm-continuous tok/s at N=16 vs transformers-serve"] == "N/A"
    assert status["shared prefix: farm-continuous TTFT p50 at N=16 vs without the prefix cache"] == "N/A"
    assert status["16-row decode step vs the batch-16 bandwidth bound"] == "N/A"
    assert status["greedy outputs identical to sequential (fp32)"] == "FAIL"
    assert "farm-continuous@1 3/4" in next(c.value for c in items if c.target.startswith("greedy"))
    assert checks_text("demo", items).splitlines()[0].startswith("N/A   demo  farm-continuous tok/s at N=16")


def test_shared_prefix_targets_compare_time_to_first_token() -> None:
    prefix = [row("farm-continuous", 16, ttft=0.4), row(NO_PREFIX_CACHE, 16, ttft=1.0),
              row("transformers-serve", 16, ttft=0.3)]
    status = by_target(checks([], "bench", prefix))
    assert status["shared prefix: farm-continuous TTFT p50 at N=16 vs without the prefix cache"] == "PASS"
    assert status["shared prefix: farm-continuous TTFT p50 at N=16 vs transformers-serve"] == "FAIL"


def test_decode_step_target_is_the_bench_models() -> None:
    step = {"of_batch16_bw": 0.51, "step_ms": 40.0}
    target = "16-row decode step vs the batch-16 bandwidth bound"
    assert by_target(checks([], "bench", None, step))[target] == "PASS"
    assert by_target(checks([], "bench", None, {**step, "of_batch16_bw": 0.49}))[target] == "FAIL"
    assert by_target(checks([], "llama32k", None, step))[target] == "INFO"


def test_sweep_text_counts_every_models_checks() -> None:
    records = [{"label": label, "acceptance": [c.to_dict() for c in checks([row("farm-continuous", 1)], label)]}
               for label in ("bench", "demo")]
    text = sweep_text(records)
    assert text.count("N/A   bench") == 8 and text.count("N/A   demo") == 8
    assert text.endswith("issue 17 targets over 2 model(s): 2 PASS, 16 N/A")


def test_shared_prefix_fills_its_tokens_with_whole_words() -> None:
    def two_per_word(text: str) -> int:
        return 2 * len(text.split())

    prefix = shared_prefix(64, two_per_word)
    assert two_per_word(prefix) == 64 and prefix == prefix.strip()
    assert two_per_word(shared_prefix(63, two_per_word)) == 62
    prompts = with_prefix(prefix, ["a b", "c"])
    assert prompts == [f"{prefix}\n\na b", f"{prefix}\n\nc"]
    with pytest.raises(ValueError, match="--shared-prefix must be at least 1 token"):
        shared_prefix(0, two_per_word)


def test_operator_shares_split_matmul_attention_and_the_rest() -> None:
    shares = operator_shares({"mkldnn::_linear_pointwise": 60.0, "aten::mm": 10.0,
                              "aten::_scaled_dot_product_flash_attention_for_cpu": 20.0, "aten::copy_": 10.0})
    assert shares == {"matmul": 0.7, "attention": 0.2, "other": 0.1}
    assert operator_shares({}) == {"matmul": 0.0, "attention": 0.0, "other": 0.0}


def sample(i: int, latency: float, generate: float | None, ttft: float = 0.5, first: float | None = 0.4,
           error: str | None = None) -> Any:
    from bench.workload import Sample

    return Sample(i, "normal", latency, ttft, 64, "x", error, 0.001, generate, first)


def test_delivery_overhead_is_latency_minus_the_workers_generate_time() -> None:
    from bench.overhead import delivery, overhead_stats, ttft_delivery

    assert delivery(sample(0, 3.0, 2.9)) == pytest.approx(0.1)
    assert ttft_delivery(sample(0, 3.0, 2.9, 0.5, 0.42)) == pytest.approx(0.08)
    assert delivery(sample(0, 3.0, None)) is None and delivery(sample(0, 3.0, 2.9, error="boom")) is None
    stats = overhead_stats([sample(0, 3.0, 2.99), sample(1, 2.0, 1.98), sample(2, 9.0, 8.97)])
    assert stats == {"overhead_ms_p50": 20.0, "ttft_overhead_ms_p50": 100.0, "farm_queue_ms_p50": 1.0}
    assert overhead_stats([sample(0, 3.0, None)]) == {}


def test_api_cost_pairs_requests_and_ignores_the_models_drift() -> None:
    from bench.overhead import api_cost

    # The model's speed drifts by 0.3 s between requests; each API request costs 5 ms more.
    base = [sample(i, 2.0 + 0.3 * i + 0.010, 2.0 + 0.3 * i) for i in range(5)]
    ours = [sample(i, 2.3 + 0.3 * i + 0.015, 2.3 + 0.3 * i, ttft=0.52) for i in range(5)]
    cost = api_cost(ours, base)
    assert cost is not None and cost["pairs"] == 5
    assert cost["latency_ms"] == pytest.approx(5.0) and cost["ttft_ms"] == pytest.approx(20.0)
    assert cost["raw_p50_diff_ms"] == pytest.approx(305.0)
    assert cost["overhead_ms_p50"] == {"farm-openai": pytest.approx(15.0), "farm-continuous": pytest.approx(10.0)}
    assert api_cost([sample(0, 2.0, None)], base) is None
    # A pair whose jobs differ is not a pair; a failed request is left out.
    assert api_cost([sample(9, 2.1, 2.0)] + ours[1:], base)["pairs"] == 4  # type: ignore[index]
    assert api_cost([sample(0, 2.1, 2.0, error="x")] + ours[1:], base)["pairs"] == 4  # type: ignore[index]


def test_issue_15_checks_use_the_api_cost_and_the_openai_throughput() -> None:
    from bench.acceptance import api_checks

    rows = [row("farm-openai", 16, 130.0), row("transformers-serve", 16, 100.0)]
    cost = {"latency_ms": 9.5, "ttft_ms": 3.0, "pairs": 16, "raw_p50_diff_ms": 71.0}
    throughput, own = api_checks(rows, cost)
    assert (throughput.status, own.status) == ("PASS", "PASS")
    assert throughput.value.startswith("1.30x") and "raw p50 difference 71.0 ms" in own.value
    assert [c.status for c in api_checks([row("farm-openai", 16, 110.0), row("transformers-serve", 16, 100.0)],
                                         {**cost, "latency_ms": 10.5})] == ["FAIL", "FAIL"]
    assert [c.status for c in api_checks([], None)] == ["N/A", "N/A"]


def _state(pid: int, want: str) -> str:
    """The process's state letter, once it is ``want`` or after 5 s (signals land asynchronously)."""
    import time

    deadline = time.monotonic() + 5
    while True:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == want or time.monotonic() > deadline:
            return state
        time.sleep(0.02)


def test_while_a_mode_runs_clients_the_other_modes_processes_are_stopped() -> None:
    import subprocess

    from bench.procs import Fleet, stop

    procs = {name: subprocess.Popen(["sleep", "60"]) for name in "ab"}
    try:
        fleet = Fleet()
        for name, process in procs.items():
            fleet.add(name, [process])
        seen: list[str] = []
        serve = fleet.serve("a", lambda jobs, c: seen.append(_state(procs["b"].pid, "T" if c > 1 else "S")))
        serve([], 16)  # "a" runs 16 clients: "b" is stopped meanwhile
        serve([], 1)  # one client: the modes take turns, all running
        assert seen == ["T", "S"]
        assert _state(procs["b"].pid, "S") == "S" and _state(procs["a"].pid, "S") == "S"  # continued after
    finally:
        for process in procs.values():
            stop(process)
