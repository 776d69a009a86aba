"""The stream follower's logic, without Redis: hand-made events and task states in, steps out."""

from __future__ import annotations

from typing import Any

from producer.follow import Follower, Step

PENDING: dict[str, Any] = {"status": "PENDING", "result": None}
SUCCESS: dict[str, Any] = {"status": "SUCCESS", "result": {"id": "r", "text": "ab"}}


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, **fields}


def test_the_stream_is_followed_to_its_end_and_nothing_after() -> None:
    follower = Follower()
    assert follower.step is Step.READ_EVENTS and not follower.started
    handed = follower.on_events([("1-0", event("start", worker="w", batch_size=3)), ("1-1", event("delta", text="a"))])
    assert [e["type"] for e in handed] == ["start", "delta"]
    assert follower.step is Step.READ_EVENTS and follower.started
    assert (follower.worker, follower.batch_size, follower.text) == ("w", 3, "a")
    handed = follower.on_events([("1-2", event("delta", text="b")), ("1-3", event("end")), ("1-4", event("delta"))])
    assert [e["type"] for e in handed] == ["delta", "end"]
    assert follower.step is Step.DONE and follower.ended
    assert follower.text == "ab" and follower.after == "1-3"


def test_a_quiet_stream_asks_for_the_task_state_then_waits_again() -> None:
    follower = Follower()
    assert follower.on_events([]) == []
    assert follower.step is Step.READ_STATE
    follower.on_state(PENDING)
    assert follower.step is Step.READ_EVENTS and follower.meta is None


def test_a_task_over_without_a_stream_ends_the_stream() -> None:
    follower = Follower()
    follower.on_events([])
    follower.on_state({"status": "FAILURE", "result": "refused"})
    assert follower.step is Step.DONE and not follower.started
    assert follower.meta == {"status": "FAILURE", "result": "refused"}


def test_a_new_start_begins_the_text_again() -> None:
    follower = Follower()
    follower.on_events([("1-0", event("start", worker="a", batch_size=2)), ("1-1", event("delta", text="lost"))])
    follower.on_events([("2-0", event("start", worker="b", batch_size=1)), ("2-1", event("delta", text="kept"))])
    assert (follower.worker, follower.batch_size, follower.text) == ("b", 1, "kept")


def test_following_the_result_looks_at_it_before_every_wait() -> None:
    follower = Follower(until_result=True)
    assert follower.step is Step.READ_STATE
    follower.on_state(PENDING)
    assert follower.step is Step.READ_EVENTS
    follower.on_events([("1-0", event("start", worker="w", batch_size=1))])
    assert follower.step is Step.READ_STATE
    follower.on_state(PENDING)
    follower.on_events([("1-1", event("delta", text="ab")), ("1-2", event("end"))])
    assert follower.step is Step.READ_STATE
    follower.on_state(PENDING)  # the end event comes a moment before the stored result
    assert follower.step is Step.PAUSE
    follower.on_pause()
    assert follower.step is Step.READ_STATE
    follower.on_state(SUCCESS)
    assert follower.step is Step.DONE and follower.meta == SUCCESS


def test_a_finished_request_is_answered_without_reading_its_stream() -> None:
    follower = Follower(until_result=True)
    follower.on_state({"status": "REVOKED", "result": None})
    assert follower.step is Step.DONE and follower.after == "0"
