"""``python -m ui.app`` subprocesses for the UI tests, on a free loopback port each, stopped by PID."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gradio_client import Client

from tests.conftest import OUTPUT, ROOT, free_port, stop_process, wait_until

FLOWER_PORT = "5599"
DEFAULTS = {"as_chat": False, "new_tokens": 64, "temp": 0.0, "p": 1.0, "adapter_name": "(farm default)",
            "seed_value": -1, "model_name": None}
"""The Completion tab's inputs after the prompt (``/generate``), in order."""
START_SECONDS = 90
"""Importing gradio takes seconds; several UIs starting at once on 2 cores take longer."""


@dataclass
class UiApp:
    url: str
    redis_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    auth: tuple[str, str] | None = None

    def client(self) -> Client:
        return Client(self.url, auth=self.auth, verbose=False, download_files=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def launch_ui(name: str, redis_url: str, **settings: str) -> UiApp:
    """``python -m ui.app`` on a free loopback port (started, not waited for)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FARM_REDIS_URL": redis_url, "FARM_FLOWER_PORT": FLOWER_PORT,
           "GRADIO_ANALYTICS_ENABLED": "False", **{f"FARM_{k.upper()}": v for k, v in settings.items()}}
    log_path = OUTPUT / "ui" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "ui.app", "--host", "127.0.0.1", "--port", str(port)],
                                   env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    auth = tuple(settings["ui_auth"].split(":", 1)) if "ui_auth" in settings else None
    return UiApp(f"http://127.0.0.1:{port}", redis_url, process, log_path, auth)  # type: ignore[arg-type]


def answers(app: UiApp) -> bool:
    if app.process.poll() is not None:
        raise AssertionError(f"the UI exited with {app.process.returncode}:\n{app.log()[-3000:]}")
    try:
        urllib.request.urlopen(app.url + "/config", timeout=2)
    except urllib.error.HTTPError:
        return True  # it answers (401 when a login is required)
    except OSError:
        return False
    return True


def generate(app: UiApp, prompt: str, **params: object) -> object:
    """``/generate`` submitted (a ``gradio_client`` job): ``prompt`` with ``DEFAULTS`` but ``params``."""
    return app.client().submit(prompt, *{**DEFAULTS, **params}.values(), api_name="/generate")


@contextmanager
def running_uis(started: dict[str, UiApp]) -> Iterator[dict[str, UiApp]]:
    """UIs launched together (their imports overlap), yielded once all answer, then stopped."""
    try:
        for app in started.values():
            wait_until(lambda app=app: answers(app), START_SECONDS, f"the UI at {app.url} did not start")
        yield started
    finally:
        for app in started.values():
            stop_process(app.process)
