"""Freed memory stays in the worker's heap (glibc ``mallopt``), so that a tensor allocated where an
earlier one was freed costs no page faults.

torch's CPU allocator is plain ``malloc``. Under glibc's defaults a block larger than the
dynamic mmap threshold is a fresh ``mmap`` that ``free`` unmaps, and the top of a heap above
128 kB is handed back to the kernel: the next tensor of that size faults in every 4 kB page
again, zeroed by the kernel. A join of 64 prompts of the 134M llama32k model took 264,000 minor
faults (1 GB) and 3.5-4.3 s in warm rounds; with the settings below, 0-1,200 faults and
2.6-3.1 s, its decode steps no page fault either (576 per step before; one process on the main
thread, 2026-12-07, docs/DESIGN.md "Freed memory stays in the heap"). Kept memory is reused by
the next allocations; the worker's resident size stays at its peak instead of shrinking between
bursts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
"""glibc's ``mallopt`` parameters (malloc.h)."""

MMAP_THRESHOLD = 32 << 20
"""Blocks below this come from the heap (glibc refuses more: half its 64 MB arena heap)."""

TRIM_THRESHOLD = 2**31 - 1
"""Free memory at a heap's top is given back only beyond 2 GB (``mallopt`` takes a C int)."""

TOP_PAD = 64 << 20
"""A heap grows by at least this much at once (fewer, larger ``brk``/``mprotect`` calls)."""


def retain_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory (above); ``False`` where the C library is not glibc
    or refuses a setting (nothing changes then)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("heap: no glibc mallopt here; freed memory goes back to the system")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
