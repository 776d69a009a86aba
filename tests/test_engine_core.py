"""The engine core on a fake runner and fake sinks: a request's life (admit, plan, run, finish),
cancellation, failure recovery and out-of-memory splitting, for both strategies on the same core.
No torch, no Redis, no model thread: the test steps the core itself."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from protocol.schema import GenerationRequest
from tests.engine_fakes import STRATEGIES, FakeOutput, expected_text, make_rig
from worker.engine.model_thread import Engine
from worker.engine.runner import OOM_MARK, POISON_MARK
from worker.engine.sinks import EngineSinks, StepRelay

PROMPTS = ["one two three", "a b", "the quick brown fox jumps", "x", "lorem ipsum dolor", "hello there",
           "c d e f g", "last one"]
LENGTHS = [12, 3, 20, 5, 9, 7, 15, 4]


def test_importing_the_core_and_its_fakes_does_not_import_torch() -> None:
    # Everything this module imports but pytest (which imports no torch either), in a fresh interpreter.
    code = ("import sys, tests.engine_fakes, worker.engine.model_thread, worker.engine.runner, worker.engine.sinks; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_request_gets_its_own_text_in_any_batch(strategy: str) -> None:
    rig = make_rig(strategy)
    for i, (prompt, n) in enumerate(zip(PROMPTS, LENGTHS, strict=True)):
        rig.submit(f"r{i}", prompt, n)
    results = rig.run()
    for i, (prompt, n) in enumerate(zip(PROMPTS, LENGTHS, strict=True)):
        result = results[f"r{i}"]
        assert result.ok and result.finish_reason == "length" and result.completion_tokens == n
        assert result.text == expected_text(prompt, n) == rig.output.streamed[f"r{i}"]
        assert result.worker == "fake@test" and result.prompt_tokens == len(prompt.split())
    assert max(r.batch_size for r in results.values()) == len(PROMPTS)
    assert rig.output.results.keys() == results.keys()
    assert rig.counter.executions == {f"r{i}": 1 for i in range(len(PROMPTS))}
    assert rig.core.stats.requests == len(PROMPTS) and rig.core.stats.tokens == sum(LENGTHS)
    assert rig.core.running == 0 and rig.core.waiting == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stop_string_and_queue_time(strategy: str) -> None:
    rig = make_rig(strategy)
    full = expected_text("stop here", 10)
    stop = full.split()[3]
    rig.submit("s", "stop here", 10, stop=(stop,))
    result = rig.run()["s"]
    assert result.finish_reason == "stop" and result.text == full[:full.index(stop)]
    assert result.queue_seconds >= 0 and result.generate_seconds >= 0 and result.first_token_seconds is not None


def test_short_request_joins_and_leaves_before_a_long_one() -> None:
    rig = make_rig("continuous")
    rig.submit("long", "a long story", 50)
    for _ in range(5):
        rig.core.step()
    rig.submit("short", "quick", 4)
    while not rig.futures["short"].done():
        rig.core.step()
    assert not rig.futures["long"].done()  # the short one joined, finished and left
    assert rig.futures["short"].result().batch_size == 2
    assert rig.run()["long"].completion_tokens == 50
    assert rig.output.begins == [(["long"], 1), (["short"], 2)]


def test_joiners_of_a_chunked_prefill_wait_while_the_running_row_goes_on() -> None:
    rig = make_rig("continuous", prefill_steps=3)
    batch = rig.core.strategy.batch  # type: ignore[attr-defined]
    rig.submit("long", "a long story", 30)
    rig.core.step()
    rig.submit("j1", "first joiner", 5)
    rig.core.step()  # j1's prefill starts; it lasts three decode steps of "long", this one the first
    rig.submit("j2", "second joiner", 5)
    steps = 0
    while rig.output.deltas["j1"] == 0:
        assert batch.joins == [["long"], ["j1"]]  # j2 waits for j1's prefill to end
        rig.core.step()
        steps += 1
    assert steps == 2 and batch.stepped_while_filling == 3 and rig.output.deltas["long"] == 5
    results = rig.run()
    assert batch.joins == [["long"], ["j1"], ["j2"]]
    for rid, prompt, n in (("long", "a long story", 30), ("j1", "first joiner", 5), ("j2", "second joiner", 5)):
        assert results[rid].text == expected_text(prompt, n)


def test_a_failed_chunk_retries_the_running_rows_and_the_joiners() -> None:
    rig = make_rig("continuous", prefill_steps=3)
    rig.submit("a", PROMPTS[0], 10)
    rig.core.step()
    rig.submit("b", PROMPTS[1], 10)
    rig.core.step()  # b is being prefilled
    rig.runner.fail_next = (0, RuntimeError("kernel failed"))
    results = rig.run()
    assert results["a"].text == expected_text(PROMPTS[0], 10) and results["b"].text == expected_text(PROMPTS[1], 10)
    assert rig.core.running == 0


def test_dynamic_batches_run_to_the_end_before_the_next() -> None:
    rig = make_rig("dynamic", max_batch_size=3)
    for i in range(5):
        rig.submit(f"r{i}", PROMPTS[i], LENGTHS[i])
    results = rig.run()
    assert rig.runner.runs == [["r0", "r1", "r2"], ["r3", "r4"]]
    assert [results[f"r{i}"].batch_size for i in range(5)] == [3, 3, 3, 2, 2]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_adapters_share_a_batch_only_when_the_runner_mixes_them(strategy: str) -> None:
    for mixes, sizes in ((True, {4}), (False, {2})):
        rig = make_rig(strategy, mixes_adapters=mixes)
        for i, adapter in enumerate(["a", "b", "a", "b"]):
            rig.submit(f"r{i}", PROMPTS[i], 30, adapter=adapter)
        results = rig.run()
        assert {r.batch_size for r in results.values()} == sizes
        assert all(results[f"r{i}"].adapter == a for i, a in enumerate(["a", "b", "a", "b"]))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_too_long_prompt_fails_alone_with_its_limit(strategy: str) -> None:
    rig = make_rig(strategy, max_prompt_tokens=3)
    rig.submit("long", "one two three four", 5)
    rig.submit("fine", "one two", 5)
    results = rig.run()
    assert results["long"].finish_reason == "error" and results["long"].error
    assert results["long"].error["code"] == "prompt_too_long" and "limit of 3" in results["long"].error["message"]
    assert results["fine"].ok and rig.counter.executions == {"fine": 1}
    assert rig.core.stats.failed == 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_request_cancelled_while_waiting_never_runs(strategy: str) -> None:
    rig = make_rig(strategy)
    rig.submit("gone", "never mind", 20)
    rig.submit("kept", "keep me", 6)
    rig.cancels.flags.add("gone")
    results = rig.run()
    assert results["gone"].finish_reason == "cancelled" and results["gone"].batch_size == 0
    assert results["gone"].completion_tokens == 0 and results["gone"].text == ""
    assert results["kept"].ok and "gone" not in rig.counter.executions


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cancel_stops_one_running_row_and_its_neighbour_goes_on(strategy: str) -> None:
    rig = make_rig(strategy)
    rig.submit("victim", "cancel me", 100)
    rig.submit("neighbour", "keep me", 40)
    rig.cancels.after_deltas["victim"] = 5
    results = rig.run()
    victim = results["victim"]
    assert victim.finish_reason == "cancelled" and 5 <= victim.completion_tokens < 100
    assert victim.text == rig.output.streamed["victim"] == expected_text("cancel me", victim.completion_tokens)
    assert results["neighbour"].ok and results["neighbour"].completion_tokens == 40


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_poisoned_request_fails_alone(strategy: str) -> None:
    rig = make_rig(strategy)
    prompts = [f"{p} {POISON_MARK}" if i == 2 else p for i, p in enumerate(PROMPTS)]
    for i, prompt in enumerate(prompts):
        rig.submit(f"r{i}", prompt, 6)
    results = rig.run()
    assert results["r2"].finish_reason == "error" and results["r2"].error
    assert results["r2"].error["code"] == "generation_failed"
    assert all(results[f"r{i}"].ok and results[f"r{i}"].text == expected_text(p, 6)
               for i, p in enumerate(prompts) if i != 2)
    assert {results[f"r{i}"].batch_size for i in range(8) if i != 2} == {1}  # retried one by one
    assert rig.core.stats.failed == 1 and rig.core.stats.oom_splits == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_out_of_memory_batch_is_halved_until_the_culprit_runs_alone(strategy: str) -> None:
    rig = make_rig(strategy, max_batch_tokens=1000)
    prompts = [f"{p} {OOM_MARK}" if i == 5 else p for i, p in enumerate(PROMPTS)]
    for i, prompt in enumerate(prompts):
        rig.submit(f"r{i}", prompt, 6)
    results = rig.run()
    assert all(r.ok and r.completion_tokens == 6 for r in results.values()), [r.error for r in results.values()]
    assert results["r5"].batch_size == 1  # split until the culprit ran alone
    assert max(r.batch_size for r in results.values()) >= 2  # its neighbours still ran batched
    assert rig.core.stats.oom_splits == 3  # 8 -> 4 -> 2 -> 1
    assert rig.core.scheduler.token_budget(time.monotonic()) < 1000
    assert rig.counter.executions["r5"] == 4 and rig.counter.executions["r0"] == 2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_failure_mid_run_retries_without_repeating_streamed_text(strategy: str) -> None:
    rig = make_rig(strategy)
    for i in range(4):
        rig.submit(f"r{i}", PROMPTS[i], 12)
    rig.runner.fail_next = (5, MemoryError("out of memory"))
    results = rig.run()
    for i in range(4):
        assert results[f"r{i}"].ok and results[f"r{i}"].text == expected_text(PROMPTS[i], 12)
        assert rig.output.streamed[f"r{i}"] == results[f"r{i}"].text  # no delta sent twice
    assert rig.core.stats.oom_splits == 1 and {r.batch_size for r in results.values()} == {2}


def test_continuous_step_failure_leaves_later_joiners_batched() -> None:
    rig = make_rig("continuous")
    rig.submit("a", PROMPTS[0], 10)
    rig.submit("b", PROMPTS[1], 10)
    rig.core.step()
    rig.runner.fail_next = (0, RuntimeError("kernel failed"))
    rig.core.step()  # the decode step fails: both rows retried alone, to the end
    assert rig.futures["a"].done() and rig.futures["b"].done()
    assert rig.core.running == 0
    rig.submit("c", PROMPTS[2], 5)
    rig.submit("d", PROMPTS[3], 5)
    results = rig.run()
    assert results["a"].text == expected_text(PROMPTS[0], 10) and results["a"].batch_size == 1
    assert results["c"].batch_size == 2 and results["d"].ok


def test_model_thread_serves_submissions_calls_and_duplicates() -> None:
    rig = make_rig("continuous")
    engine = Engine(rig.core)
    request = GenerationRequest(prompt="hello there", max_new_tokens=5)
    first = engine.submit("dup", request, time.time())
    assert engine.submit("dup", request, time.time()) is first  # a redelivery shares the running one
    called = engine.call(lambda: "on the model thread")
    engine.start()
    try:
        assert first.result(timeout=5).text == expected_text("hello there", 5)
        assert called.result(timeout=5) == "on the model thread"
        rig.output.results.clear()
        other = engine.submit("dup", request, time.time())
        assert other is not first and other.result(timeout=5).ok  # a finished id runs anew
    finally:
        engine.stop()
    assert engine.stats.requests == 2 and engine.waiting == 0


def test_cancel_flags_are_read_at_most_every_poll_interval() -> None:
    reads: list[list[str]] = []

    class Flags:
        def cancelled(self, request_ids: list[str]) -> set[str]:
            reads.append(request_ids)
            return {"a"}

    output, now = FakeOutput(), [0.0]
    relay = StepRelay(EngineSinks(output, Flags(), cancel_poll_seconds=0.05), clock=lambda: now[0])
    assert relay.on_step({"a": "x", "b": "y"}, []) == {"a"}
    now[0] = 0.01
    assert relay.on_step({"a": "z", "b": ""}, []) == {"a"}  # answered from the last read
    now[0] = 0.06
    relay.on_step({"b": "w"}, ["b"])
    assert reads == [["a", "b"], ["b"]]
    assert output.streamed == {"a": "xz", "b": "yw"}
