"""The reliability report: fault tests record what happened to their rows; pytest prints a table at
the end of the run and writes test-output/reliability.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parent.parent / "test-output" / "reliability.json"


@dataclass
class FaultFigures:
    fault: str
    submitted: int = 0
    completed: int = 0
    lost: int = 0
    duplicated: int = 0
    redelivered: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


REPORT: list[FaultFigures] = []


def record(figures: FaultFigures) -> None:
    REPORT.append(figures)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps([asdict(f) for f in REPORT], indent=2))


def figures_from(fault: str, submitted_ids: list[str], result_ids: list[str],
                 executions: dict[str, int], redelivered: dict[str, int], **notes: Any) -> FaultFigures:
    """Count lost, duplicated and redelivered rows from ids submitted, results seen, and the
    workers' counters (executions and redeliveries per id)."""
    seen = set(result_ids)
    ran_twice = sum(1 for i in submitted_ids if executions.get(i, 0) > 1)
    return FaultFigures(
        fault=fault, submitted=len(submitted_ids), completed=len(seen & set(submitted_ids)),
        lost=len(set(submitted_ids) - seen), duplicated=len(result_ids) - len(seen),
        redelivered=sum(1 for i in submitted_ids if redelivered.get(i, 0) > 0),
        notes={"executed_twice": ran_twice, **notes})


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORT:
        return
    write = terminalreporter.write_line
    terminalreporter.section("reliability report")
    header = ("fault", "submitted", "completed", "lost", "duplicated", "redelivered")
    write(f"{header[0]:<28}{header[1]:>10}{header[2]:>10}{header[3]:>6}{header[4]:>11}{header[5]:>12}  notes")
    for f in REPORT:
        notes = ", ".join(f"{k}={v}" for k, v in f.notes.items())
        counts = f"{f.submitted:>10}{f.completed:>10}{f.lost:>6}{f.duplicated:>11}{f.redelivered:>12}"
        write(f"{f.fault:<28}{counts}  {notes}")
