"""The worker's first burst finds its memory ready: the warm-up's shape and its failures (pure), and
the heap that keeps freed memory (a real glibc process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from protocol.settings import FarmSettings
from worker.engine.warmup import PROMPT_TOKENS, STEPS, warm_up, warm_up_shape


def test_the_warm_up_is_the_largest_batch_within_the_token_budget() -> None:
    assert warm_up_shape(FarmSettings(max_batch_size=64, max_batch_tokens=8192)) == (64, PROMPT_TOKENS)
    rows, tokens = warm_up_shape(FarmSettings(max_batch_size=64, max_batch_tokens=1000))
    assert rows == 1000 // (PROMPT_TOKENS + STEPS + 1) and rows * (tokens + STEPS + 1) <= 1000
    assert warm_up_shape(FarmSettings(max_batch_size=4, max_prompt_tokens=16)) == (4, 16)
    assert warm_up_shape(FarmSettings(max_batch_size=8, max_batch_tokens=10)) == (1, PROMPT_TOKENS)


class _FailingRunner:
    """A runner at its seam: encoding works, making a row runs out of memory."""

    def encode(self, text: str) -> list[int]:
        return [1, 2, 3]

    def new_row(self, *args: object) -> object:
        raise RuntimeError("CUDA out of memory (simulated)")


def test_a_failed_warm_up_is_logged_and_the_worker_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    assert warm_up(_FailingRunner(), FarmSettings()) == 0  # type: ignore[arg-type]
    assert "warm-up of 64 rows x 32 tokens failed" in caplog.text and "out of memory" in caplog.text


_FAULTS = textwrap.dedent("""
    import resource, sys
    from worker.heap import retain_freed_memory
    if sys.argv[1] == "retain":
        assert retain_freed_memory()
    def burst():
        blocks = [bytearray(8 << 20) for _ in range(24)]  # 192 MB, zeroed (touched) by Python
        del blocks
    burst()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    burst()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_freed_memory_stays_in_the_heap_so_a_second_burst_faults_no_pages() -> None:
    def faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", _FAULTS, mode], check=True, capture_output=True,
                                  text=True).stdout)

    pages = (24 * 8 << 20) // 4096
    assert faults("default") > pages // 2  # glibc gave the burst back; the second faults it in again
    assert faults("retain") < pages // 20
