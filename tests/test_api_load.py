"""The bounded load test: 500 streaming connections at once against one ``farm api`` process (its
own Redis and tiny-model worker); every stream completes, none fails. RSS and CPU are printed,
not asserted (speed and size belong to the bench)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_500_concurrent_streams_all_complete(tiny_model: object) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.api_load", "--connections", "500"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    report = json.loads(done.stdout)
    print(report)
    assert (report["errors"], report["complete"]) == (0, 500), report["first_errors"]
    assert done.returncode == 0
