"""Bulk jobs: many prompts in, results out in input order; windowed, resumable, cancellable.

By role: ``book`` (pure row states, progress, rates), ``ledger`` (the rows as this process knows
them, shared between threads), ``store`` (every Redis key and read/write of a job), ``lease``
(one sending process at a time), ``sender`` (the pump thread) and ``job`` (the public ``Job``).
"""

from producer.jobs.book import (CANCELLED, FAILED, KINDS, OK, PENDING, SENT, JobProgress, RateMeter, RowBook,
                                book_from_bitmaps, check_job_id, format_duration, outcome)
from producer.jobs.job import Job
from producer.jobs.lease import Lease
from producer.jobs.ledger import Ledger
from producer.jobs.sender import Sender
from producer.jobs.store import JobStore

__all__ = ["CANCELLED", "FAILED", "KINDS", "OK", "PENDING", "SENT", "Job", "JobProgress", "JobStore", "Lease",
           "Ledger", "RateMeter", "RowBook", "Sender", "book_from_bitmaps", "check_job_id", "format_duration",
           "outcome"]
