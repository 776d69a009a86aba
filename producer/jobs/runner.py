"""``JobRunner``: pumps detached jobs in this process, one ``Job`` (its lease and pump thread)
per job it wins.

Every ``farm api`` process runs one. Each scan reads the registry (``DetachedJobs``), drops the
jobs that ended, and tries the lease of each job no process pumps: the lease makes exactly one
runner pump a job at a time, and a runner that dies loses its jobs to the others when their
leases lapse (at once on the same host, whose dead pids are recognised).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from protocol.errors import FarmError
from protocol.schema import Limits

from producer.connection import FarmConnection
from producer.jobs.detached import DetachedJobs
from producer.jobs.job import Job
from producer.jobs.store import JobStore

SCAN_SECONDS = 1.0
"""How often the registry is read: a job whose runner died waits about this long (after its
lease lapses) for another."""
ENDED = ("finished", "cancelled", "")
"""Job states with nothing left to send ("": the job expired from Redis)."""

log = logging.getLogger(__name__)


class JobRunner:
    """Scans the detached jobs every ``SCAN_SECONDS`` and pumps those whose lease it wins."""

    def __init__(self, connection: FarmConnection, limits: Callable[[], Limits],
                 scan_seconds: float = SCAN_SECONDS) -> None:
        self.connection, self.limits, self.scan_seconds = connection, limits, scan_seconds
        self.registry = DetachedJobs(connection)
        self.jobs: dict[str, Job] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> JobRunner:
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop scanning and pumping (rows already sent still run); the leases are released, so
        another runner takes the jobs over at its next scan."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for job in list(self.jobs.values()):
            job.close()
        self.jobs.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except FarmError as error:  # Redis away or a job refused: the next scan tries again
                log.warning("job runner: %s", error)
            self._stop.wait(self.scan_seconds)

    def scan(self) -> list[str]:
        """One pass over the registry; returns the ids of the jobs this process pumps now."""
        self._drop_stopped()
        for job_id in self.registry.ids():
            if job_id in self.jobs or self._stop.is_set():
                continue
            if JobStore(self.connection, job_id).state() in ENDED:
                self.registry.remove(job_id)
                continue
            job = Job.resume(self.connection, self.limits(), job_id)
            if job is not None:
                log.info("job runner: pumping job %s", job_id)
                self.jobs[job_id] = job
        return sorted(self.jobs)

    def _drop_stopped(self) -> None:
        """Jobs whose pump ended: finished or cancelled ones leave the registry; one that lost
        its lease or failed is left to the next scan (here or in another runner)."""
        for job_id, job in list(self.jobs.items()):
            if job.sender.running:
                continue
            job.close()
            del self.jobs[job_id]
            if JobStore(self.connection, job_id).state() in ENDED:
                self.registry.remove(job_id)
