"""Per-row decoding: stop rules and streaming deltas, with a toy decoder (one char per token)."""

from __future__ import annotations

from collections.abc import Sequence

from worker.rows import RowState

EOS = 0


def decode(ids: Sequence[int]) -> str:
    return "".join(chr(i) for i in ids)


def feed(state: RowState, text: str) -> list[str]:
    return [state.push(ord(c), decode, now=float(i)) for i, c in enumerate(text)]


def test_length_limit_and_deltas_equal_text() -> None:
    state = RowState(max_new_tokens=5, eos_ids=frozenset({EOS}))
    deltas = feed(state, "abcdefgh")
    assert state.finish_reason == "length"
    assert "".join(deltas) == state.emitted == "abcde"


def test_eos_stops_and_is_not_text() -> None:
    state = RowState(max_new_tokens=10, eos_ids=frozenset({EOS}))
    feed(state, "ab")
    state.push(EOS, decode, 3.0)
    assert (state.finish_reason, state.emitted, state.tokens) == ("stop", "ab", [ord("a"), ord("b")])


def test_ignore_eos_keeps_going() -> None:
    state = RowState(max_new_tokens=3, eos_ids=frozenset({EOS}), ignore_eos=True)
    state.push(EOS, decode, 0.0)
    assert not state.done


def test_stop_string_is_held_back_and_cut() -> None:
    state = RowState(max_new_tokens=20, stop=("END",))
    deltas = feed(state, "helloENxEND tail")
    assert state.finish_reason == "stop"
    assert state.emitted == "helloENx"
    assert "".join(deltas) == "helloENx"
    assert deltas[5] == "" and deltas[6] == ""  # "E", "EN" could start the stop string


def test_incomplete_utf8_is_not_streamed_until_complete() -> None:
    pieces = {1: "a", 2: "\ufffd"}

    def partial(ids: Sequence[int]) -> str:
        text = "".join(pieces.get(i, "") for i in ids)
        return text.replace("\ufffd", "é") if 3 in ids else text

    state = RowState(max_new_tokens=5)
    assert state.push(1, partial, 0.0) == "a"
    assert state.push(2, partial, 1.0) == ""
    assert state.push(3, partial, 2.0) == "é"


def test_cancel_keeps_text_so_far() -> None:
    state = RowState(max_new_tokens=10)
    feed(state, "abc")
    assert state.cancel(decode, 5.0) == ""
    assert (state.finish_reason, state.emitted) == ("cancelled", "abc")
    assert state.push(ord("d"), decode, 6.0) == ""
