"""The rows of a job as one process knows them (shared by its threads), without Redis."""

from __future__ import annotations

import threading

from producer.jobs import CANCELLED, FAILED, OK, Ledger, RowBook
from protocol.schema import GenerationResult


def result(index: int, reason: str = "length", tokens: int = 4) -> GenerationResult:
    error = {"code": "internal", "message": "x"} if reason == "error" else None
    return GenerationResult(id=f"j:{index}", text=f"t{index}", finish_reason=reason, completion_tokens=tokens,
                            error=error)


def sent_book(total: int) -> RowBook:
    book = RowBook(total=total)
    for i in range(total):
        book.mark_sent(i)
    return book


def test_recorded_rows_finish_in_the_book_and_wake_a_waiting_reader() -> None:
    ledger = Ledger("j", window=4)
    ledger.reload(sent_book(3), created=0.0, cancelled=False)
    woken = threading.Event()

    def reader() -> None:
        with ledger.cond:
            while ledger.book.counts[OK] == 0:
                ledger.cond.wait(5)
        woken.set()

    thread = threading.Thread(target=reader)
    thread.start()
    ledger.record([(1, result(1)), (2, result(2, "error")), (0, result(0, "cancelled"))])
    thread.join(5)
    assert woken.is_set()
    assert ledger.book.counts[1:] == [1, 1, 1] and ledger.book.finished
    assert ledger.cached([0, 1, 2]) == {0: result(0, "cancelled"), 1: result(1), 2: result(2, "error")}
    assert ledger.book.states[2] & 3 == FAILED and ledger.book.states[0] & 3 == CANCELLED


def test_progress_counts_rows_and_names_the_state() -> None:
    ledger = Ledger("j", window=4)
    ledger.reload(sent_book(4), created=0.0, cancelled=False)
    ledger.record([(0, result(0))])
    progress = ledger.progress()
    assert (progress.state, progress.total, progress.done, progress.pending, progress.sent) == ("running", 4, 1, 3, 4)
    ledger.record([(1, result(1)), (2, result(2)), (3, result(3))])
    assert ledger.progress().state == "finished"
    ledger.cancelled = True
    assert ledger.progress().state == "cancelled"


def test_rates_start_with_the_second_look() -> None:
    ledger = Ledger("j", window=4)
    ledger.reload(sent_book(4), created=0.0, cancelled=False)
    ledger.record([(0, result(0, tokens=10))])  # found finished at the first look: no rate yet
    ledger.record([(1, result(1, tokens=10))])
    progress = ledger.progress()
    assert progress.rows_per_second > 0 and progress.tokens_per_second > 0
    assert progress.eta_seconds is not None


def test_reopened_rows_are_pending_again_and_forgotten() -> None:
    ledger = Ledger("j", window=4)
    ledger.reload(sent_book(2), created=0.0, cancelled=False)
    ledger.record([(0, result(0, "error")), (1, result(1))])
    ledger.reopen([0])
    assert ledger.book.untouched(0) and ledger.cached([0, 1]) == {1: result(1)}
    assert not ledger.book.finished


def test_the_cache_keeps_a_bounded_number_of_results() -> None:
    ledger = Ledger("j", window=1)
    ledger.reload(sent_book(10), created=0.0, cancelled=False)
    ledger.record([(i, result(i)) for i in range(10)])
    assert sorted(ledger.cached(list(range(10)))) == [6, 7, 8, 9]


def test_a_finished_job_keeps_its_mean_rate_over_its_busy_time() -> None:
    ledger = Ledger("j", window=4)
    ledger.reload(sent_book(4), created=100.0, cancelled=False, tokens=80, last_result=110.0)
    ledger.record([(i, result(i)) for i in range(4)])  # one look at a job that ran unwatched
    progress = ledger.progress()
    assert progress.state == "finished"
    assert (progress.rows_per_second, progress.tokens_per_second) == (0.4, 8.0)  # 4 rows, 80 tokens in 10 s
