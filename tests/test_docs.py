"""The README stays true: its quickstart is exactly the two commands, CI runs the test one, and its
settings table is the one generated from the code."""

from __future__ import annotations

import re
from pathlib import Path

from ops.settings_doc import table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_quickstart_is_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    block = re.search(r"## Quickstart\s+```\n(.*?)```", README, re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["./farm up", "./farm test"]
    assert "./farm test" in (ROOT / ".ci" / "run").read_text()


def test_settings_table_matches_the_code() -> None:
    assert table() in README, "README settings table is stale: paste `python -m ops.settings_doc`"
