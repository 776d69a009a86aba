"""A job's bookkeeping without Redis: row states, ordering, bitmaps, rates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from producer.jobs import (CANCELLED, FAILED, OK, PENDING, SENT, JobProgress, RateMeter, RowBook, book_from_bitmaps,
                           check_job_id, outcome)
from protocol.errors import RequestError
from protocol.schema import GenerationResult


def in_order(book: RowBook, start: int = 0) -> list[int]:
    """What ``Job.results`` yields now: the finished run from ``start``."""
    return list(range(start, start + book.ready_run(start, 10**6)))


def test_results_wait_for_the_first_unfinished_row() -> None:
    book = RowBook(total=5)
    for i in range(5):
        book.mark_sent(i)
    assert book.outstanding == {0, 1, 2, 3, 4}
    for i in (3, 1, 2):
        book.finish(i, OK)
    assert in_order(book) == []
    assert in_order(book, 1) == [1, 2, 3]
    book.finish(0, FAILED)
    assert in_order(book) == [0, 1, 2, 3]
    assert list(book.order) == [3, 1, 2, 0]
    assert not book.finished
    book.finish(4, CANCELLED)
    assert book.finished and book.outstanding == set()
    assert book.counts == [0, 3, 1, 1]


def test_a_row_is_recorded_once() -> None:
    book = RowBook(total=2)
    book.mark_sent(0)
    assert book.finish(0, OK)
    assert not book.finish(0, FAILED)
    assert book.counts[OK] == 1 and list(book.order) == [0]


@given(st.permutations(range(40)))
def test_any_completion_order_yields_every_row_once_in_input_order(order: list[int]) -> None:
    book = RowBook(total=40)
    yielded: list[int] = []
    for i in order:
        book.mark_sent(i)
    for i in order:
        book.finish(i, OK)
        run = in_order(book, len(yielded))
        yielded += run
    assert yielded == list(range(40))
    assert sorted(book.order) == list(range(40))


def test_unknown_total_grows_with_the_rows_handed_out() -> None:
    book = RowBook()
    book.mark_sent(0)
    book.mark_sent(1)
    book.finish(0, OK)
    book.finish(1, OK)
    assert not book.finished  # a lazy source may still have rows
    book.set_total(2)
    assert book.finished


def test_cancel_marks_only_unsent_rows_and_sent_rows_wait_for_their_result() -> None:
    book = RowBook(total=6)
    for i in range(3):
        book.mark_sent(i)
    book.finish(0, OK)
    assert book.cancel_unsent(handed=3) == [3, 4, 5]
    assert book.counts == [2, 1, 0, 3]
    assert book.outstanding == {1, 2}
    book.finish(1, CANCELLED)
    book.finish(2, CANCELLED)
    assert book.finished


def test_cancel_of_a_lazy_job_ends_it_at_the_rows_handed_out() -> None:
    book = RowBook()
    book.mark_sent(0)
    book.cancel_unsent(handed=4)
    assert book.total == 4 and book.counts[CANCELLED] == 3


def test_reopen_makes_a_failed_row_pending_and_unsent() -> None:
    book = RowBook(total=2)
    book.mark_sent(0)
    book.mark_sent(1)
    book.finish(0, FAILED)
    book.finish(1, OK)
    book.reopen(0)
    assert book.untouched(0) and not book.untouched(1)
    assert book.counts == [1, 1, 0, 0] and book.sent == 1
    assert book.indices(FAILED) == []


def bitmap(bits: set[int], size: int) -> bytes:
    """A Redis bitmap: bit ``i`` is the ``7 - i % 8``th bit of byte ``i // 8``."""
    out = bytearray((size + 7) // 8)
    for i in bits:
        out[i // 8] |= 0x80 >> (i % 8)
    return bytes(out)


def test_book_from_bitmaps_reads_redis_bit_order() -> None:
    sent, ok, failed, cancelled = {0, 1, 2, 3, 9, 10}, {0, 9}, {2}, {3}
    book = book_from_bitmaps(12, *(bitmap(b, 11) for b in (sent, ok, failed, cancelled)))
    assert len(book.states) == 12
    assert book.states[0] == OK | SENT and book.states[2] == FAILED | SENT and book.states[3] == CANCELLED | SENT
    assert book.states[1] == SENT and book.states[11] == PENDING
    assert book.outstanding == {1, 10}
    assert book.counts == [12 - 4, 2, 1, 1] and book.sent == 6
    assert list(book.order) == [0, 2, 3, 9]


def test_book_from_bitmaps_without_total_ends_at_the_last_row_marked() -> None:
    book = book_from_bitmaps(None, bitmap({0, 1, 2}, 3), bitmap({0}, 1), b"", b"")
    assert len(book.states) == 3 and book.total is None
    assert book_from_bitmaps(None, b"", b"", b"", b"").states == bytearray()


def test_rates_cover_the_recent_window() -> None:
    meter = RateMeter(started=100.0, window=30.0)
    assert meter.rates(101.0) == (0.0, 0.0)
    meter.add(105.0, 10, 40)
    meter.add(110.0, 10, 40)
    assert meter.rates(110.0) == (2.0, 8.0)  # 20 rows over the 10 s since the start
    assert meter.rates(200.0) == (0.0, 0.0)  # nothing finished in the last 30 s


def test_outcome_of_results() -> None:
    assert outcome(GenerationResult(finish_reason="length")) == OK
    assert outcome(GenerationResult(finish_reason="stop")) == OK
    assert outcome(GenerationResult(finish_reason="cancelled")) == CANCELLED
    assert outcome(GenerationResult(finish_reason="error", error={"code": "x", "message": "y"})) == FAILED


def test_progress_summary_reads_as_one_line() -> None:
    progress = JobProgress("j", "running", 100, 60, 2, 1, 37, 80, 12.5, 40.0, 3.0)
    assert progress.completed == 63
    assert progress.summary() == ("job j: running, 63/100 rows (60 done, 2 failed, 1 cancelled, 37 pending), "
                                  "12.5 rows/s, 40.0 tokens/s, ETA 0:03")


@pytest.mark.parametrize("job_id", ["a", "nightly-2024.01_run", "x" * 64])
def test_job_ids_that_are_accepted(job_id: str) -> None:
    assert check_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id", ["", "-a", "a:b", "a*", "a b", "x" * 65])
def test_job_ids_that_are_refused(job_id: str) -> None:
    with pytest.raises(RequestError, match="job_id: must be 1 to 64"):
        check_job_id(job_id)
