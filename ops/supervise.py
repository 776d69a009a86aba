"""Child processes of ``farm up``: started in their own process group, logs prefixed with their
name, restarted with backoff when asked, stopped by group so that nothing is left behind.

Each child runs in a new session (``start_new_session``): a Ctrl-C in the terminal reaches only
``farm up``, which then stops the children itself, in order. Signals go to the whole group, so a
child's own children (a Redis background save, say) stop with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

Say = Callable[[str], None]


@dataclass
class ChildSpec:
    """What to run and how to treat it."""

    name: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    restart: bool = False
    """Restart with backoff when it exits without being asked to."""
    stdin: bytes | None = None
    """Written to the child's stdin, then closed (Redis reads its config there, secrets and all)."""
    stop_timeout: float = 20.0
    """Seconds between SIGTERM and SIGKILL when stopping."""


def backoff_delay(failures: int, base: float = 1.0, cap: float = 30.0) -> float:
    """Seconds to wait before restart number ``failures`` (1, 2, 4, ... capped)."""
    return min(cap, base * 2 ** max(0, failures - 1))


class Output:
    """Serialises lines from many threads onto one stream, each with its ``[name]`` prefix."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def line(self, name: str, text: str) -> None:
        with self._lock:
            self.stream.write(f"[{name}] {text.rstrip()}\n")
            self.stream.flush()

    def say(self, text: str) -> None:
        self.line("farm", text)


class Child:
    """One running child process and its restart bookkeeping."""

    def __init__(self, spec: ChildSpec, output: Output) -> None:
        self.spec, self.output = spec, output
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.failures = 0
        self.restart_at: float | None = None
        self.stopping = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        stdin = subprocess.PIPE if self.spec.stdin is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.spec.cmd, env={**self.spec.env, "PYTHONUNBUFFERED": "1"}, stdin=stdin,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        if self.spec.stdin is not None and self.process.stdin is not None:
            self.process.stdin.write(self.spec.stdin)
            self.process.stdin.close()
        self.started_at, self.restart_at = time.monotonic(), None
        threading.Thread(target=self._pump, args=(self.process,), name=f"log-{self.name}", daemon=True).start()
        self.output.say(f"started {self.name} (pid {self.process.pid})")

    def _pump(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in iter(process.stdout.readline, b""):
            self.output.line(self.name, raw.decode(errors="replace"))
        process.stdout.close()

    def exited(self) -> int | None:
        """The exit code once the child has ended on its own (``None`` while running or stopping)."""
        if self.process is None or self.stopping:
            return None
        return self.process.poll()

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after ``stop_timeout``; returns once it is gone."""
        if self.process is None:
            self.stopping = True
            return
        if not self.stopping:
            self.request_stop()
        try:
            self.process.wait(self.spec.stop_timeout)
        except subprocess.TimeoutExpired:
            self.output.say(f"{self.name} did not stop in {self.spec.stop_timeout:.0f}s; killing it")
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()
        _signal_group(self.process.pid, signal.SIGKILL)  # anything the leader left in its group

    def request_stop(self) -> None:
        """Send SIGTERM without waiting (to stop several children at once)."""
        self.stopping = True
        if self.process is not None and self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already empty


class Supervisor:
    """Starts children, reports deaths, restarts those that ask for it, stops them in order."""

    def __init__(self, output: Output, stable_seconds: float = 60.0) -> None:
        self.output = output
        self.children: list[Child] = []
        self.stable_seconds = stable_seconds

    def start(self, spec: ChildSpec) -> Child:
        child = Child(spec, self.output)
        child.start()
        self.children.append(child)
        return child

    def poll(self, now: float | None = None) -> list[Child]:
        """Report children that died, restart those due; returns the children that died now."""
        now = time.monotonic() if now is None else now
        died = []
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.start()
                continue
            code = child.exited()
            if code is not None:
                died.append(child)
                self._on_death(child, code, now)
        return died

    def _on_death(self, child: Child, code: int, now: float) -> None:
        if not child.spec.restart:
            self.output.say(f"{child.name} exited with code {code}; not restarted")
            child.stopping = True
            return
        child.failures = 1 if now - child.started_at >= self.stable_seconds else child.failures + 1
        delay = backoff_delay(child.failures)
        self.output.say(f"{child.name} exited with code {code}; restarting in {delay:.0f}s")
        child.restart_at = now + delay

    def stop(self, groups: list[list[str]]) -> None:
        """Stop children group by group (names in a group stop together); then any others."""
        named = {name for group in groups for name in group}
        rest = [c.name for c in self.children if c.name not in named]
        for group in [*groups, rest]:
            members = [c for c in self.children if c.name in group]
            for child in members:
                child.request_stop()
            for child in members:
                child.stop()
                self.output.say(f"stopped {child.name}")
