"""The batching policy, without a model or a clock."""

from __future__ import annotations

from worker.engine.scheduler import ContinuousScheduler, DynamicScheduler, Pending, batch_cost, split_for_retry


def pending(rid: str, arrived: float = 0.0, prompt: int = 10, new: int = 10, priority: int = 0,
            group: str = "") -> Pending:
    return Pending(rid, prompt, new, arrived, priority, group)


def test_waits_for_batch_mates_until_max_wait() -> None:
    s = DynamicScheduler(max_batch_size=4, max_wait_s=0.05)
    s.add(pending("a", arrived=1.0))
    assert s.next_batch(1.01) == []
    assert abs((s.wait_time(1.01) or 0.0) - 0.04) < 1e-9
    assert [p.request_id for p in s.next_batch(1.05)] == ["a"]
    assert s.wait_time(2.0) is None


def test_idle_continuous_engine_starts_a_lone_request_at_once() -> None:
    s = ContinuousScheduler(max_batch_size=4, max_wait_s=10)
    s.add(pending("a", arrived=1.0))
    assert s.wait_time(1.0) == 0.0
    assert [p.request_id for p in s.joiners([], 1.0)] == ["a"]
    assert s.wait_time(1.0) is None
    s.add(pending("b", arrived=1.001))
    assert [p.request_id for p in s.joiners([pending("a", arrived=1.0)], 1.001)] == ["b"]


def test_full_batch_starts_at_once_and_respects_size() -> None:
    s = DynamicScheduler(max_batch_size=3, max_wait_s=10)
    for i in range(5):
        s.add(pending(str(i), arrived=0.0))
    assert [p.request_id for p in s.next_batch(0.0)] == ["0", "1", "2"]
    assert s.next_batch(0.0) == []  # two left, not full, not due
    assert len(s.next_batch(10.0)) == 2


def test_interactive_runs_before_older_bulk() -> None:
    s = DynamicScheduler(max_batch_size=2, max_wait_s=0)
    s.add(pending("bulk1", arrived=0.0, priority=1))
    s.add(pending("bulk2", arrived=0.1, priority=1))
    s.add(pending("ui", arrived=0.5, priority=0))
    assert [p.request_id for p in s.next_batch(1.0)] == ["ui", "bulk1"]


def test_token_budget_limits_padded_batch_cost() -> None:
    s = DynamicScheduler(max_batch_size=16, max_batch_tokens=100, max_wait_s=0)
    s.add(pending("long", prompt=40, new=10))
    for i in range(4):
        s.add(pending(f"short{i}", arrived=0.1, prompt=5, new=5))
    batch = s.next_batch(1.0)
    assert batch_cost(batch) <= 100
    assert [p.request_id for p in batch] == ["long", "short0"]


def test_lone_request_over_budget_still_runs() -> None:
    s = DynamicScheduler(max_batch_tokens=10, max_wait_s=0)
    s.add(pending("huge", prompt=500, new=500))
    assert [p.request_id for p in s.next_batch(0.0)] == ["huge"]


def test_groups_never_share_a_batch() -> None:
    s = DynamicScheduler(max_batch_size=8, max_wait_s=0)
    s.add(pending("a1", group="a"))
    s.add(pending("b1", group="b"))
    s.add(pending("a2", group="a"))
    assert [p.request_id for p in s.next_batch(0.0)] == ["a1", "a2"]
    assert [p.request_id for p in s.next_batch(0.0)] == ["b1"]


def test_out_of_memory_lowers_budget_for_a_while() -> None:
    s = DynamicScheduler(max_batch_tokens=1000, max_wait_s=0, oom_backoff_s=30)
    s.on_out_of_memory(now=0.0, failed_cost=800)
    assert s.token_budget(1.0) == 400
    s.on_out_of_memory(now=2.0, failed_cost=400)
    assert s.token_budget(3.0) == 200
    assert s.token_budget(40.0) == 1000


def test_split_for_retry_halves_until_single() -> None:
    items = [pending(str(i)) for i in range(5)]
    halves = split_for_retry(items)
    assert [len(h) for h in halves] == [2, 3]
    assert split_for_retry(items[:1]) == [items[:1]]

