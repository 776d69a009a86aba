"""The worker's log at the default level: ids and timings, no prompt or result text, no noise."""

from __future__ import annotations

import pytest

from producer import FarmClient
from tests.conftest import WorkerProcess, wait_until

pytestmark = pytest.mark.integration


def test_the_worker_log_holds_no_prompt_nor_result_text(client: FarmClient, farm_worker: WorkerProcess) -> None:
    results = [client.generate(f"xylophonequark request {i}", max_new_tokens=12, timeout=60) for i in range(4)]
    job = client.submit_job([f"xylophonequark bulk {i}" for i in range(6)], max_new_tokens=12)
    job.wait(timeout=120)
    ids = [r.id for r in results]
    wait_until(lambda: all(f"[{i}] succeeded in" in farm_worker.log() for i in ids), 30, "successes not logged")
    log = farm_worker.log()
    assert "xylophonequark" not in log
    texts = [r.text.strip() for r in results + list(job.results(timeout=60))]
    assert not [t for t in texts if len(t) >= 8 and t in log]
    assert "'text':" not in log
    for noise in ("superuser privileges", "No module named 'kernels'", "is_gradient_checkpointing"):
        assert noise not in log, noise
