"""The model cache on disk: the build marker, the build lock and the atomic install.

No torch here: ``farm up`` asks whether a build is current, and which adapters it serves, without
paying for the model libraries' import.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MARKER = "farm-model.json"
# Bump whenever a recipe changes: cached builds with another version are rebuilt.
BUILD_VERSION = 3


def read_marker(out_dir: Path) -> dict[str, object] | None:
    try:
        data = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_current(out_dir: str | Path, size: str, seed: int | None = None) -> bool:
    """True when `out_dir` holds a complete build of `size` made by this BUILD_VERSION (and, when
    given, with `seed`: another seed is another model of the same size)."""
    marker = read_marker(Path(out_dir))
    return (marker is not None and marker.get("size") == size and marker.get("version") == BUILD_VERSION
            and (seed is None or marker.get("seed") == seed))


def write_marker(build_dir: Path, size: str, params: int, adapters: dict[str, str], seed: int | None = None) -> None:
    """The marker, written last: its presence says the build is complete.

    `adapters` maps the request name each adapter is served under to its path inside the build.
    """
    marker = {"size": size, "version": BUILD_VERSION, "params": params, "adapters": adapters, "seed": seed}
    (build_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def served_adapters(model_dir: str | Path) -> dict[str, str]:
    """``FARM_ADAPTER``/``FARM_ADAPTERS`` values that serve a build's adapters under their names."""
    marker = read_marker(Path(model_dir)) or {}
    adapters = marker.get("adapters")
    named = {str(k): str(Path(model_dir) / str(v)) for k, v in adapters.items()} if isinstance(adapters, dict) else {}
    env = {"FARM_ADAPTERS": ",".join(f"{name}={path}" for name, path in named.items() if name != "default")}
    if "default" in named:
        env["FARM_ADAPTER"] = named["default"]
    return env


def check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that is neither empty nor one of our builds (e.g. a typo'd '.')."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and read_marker(out_dir) is None:
        raise FileExistsError(f"{out_dir} is not empty and holds no {MARKER}; refusing to replace it")


def _make_readable(build_dir: Path) -> None:
    """Workers may run as another user: mkdtemp (0700) and safetensors (0600) files are too private."""
    for path in (build_dir, *build_dir.rglob("*")):
        path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))


def install(build_dir: Path, out_dir: Path) -> None:
    """Move a finished build into place; readers never see a half-written model."""
    check_replaceable(out_dir)
    _make_readable(build_dir)
    old = None
    if out_dir.exists():
        # rename(2) cannot replace a non-empty directory: move the old build aside first.
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.replace(out_dir, old / "model")
    os.replace(build_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def build_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of `out_dir` (same filesystem, so the final rename is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.build-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_builds(out_dir: Path) -> None:
    """Delete temporary siblings left by killed builds; call only while holding the build lock."""
    for kind in ("build", "old"):
        for path in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.{kind}-*"):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def build_lock(out_dir: Path) -> Iterator[None]:
    """Serialize builders of one `out_dir`: one worker per device on a host all ensure the same model.

    Without it, a second builder would swap the directory under a worker that is loading it.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
