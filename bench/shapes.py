"""The model shapes ``farm bench --models`` sweeps, and how an entry of that list names a model.

A shape is built locally and cached under ``.farm/models/<name>`` like every embedded model
(``farm make-model``); an entry that is not a shape name is a model directory. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shape:
    """One model of the sweep: the ``farm make-model --size`` that builds it, and what it is."""

    name: str
    size: str
    about: str


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("bench", "bench", "random 98M Llama: 8,192-token vocabulary, untied embeddings, 12 heads (MHA)"),
    Shape("llama32k", "llama32k", "random 134M Llama: 32,000-token vocabulary, untied embeddings, 12 heads (MHA)"),
    Shape("demo", "demo", "SmolLM2-135M-Instruct: 49,152-token vocabulary, tied embeddings, GQA (9 heads, 3 KV)"),
)}
DEFAULT_SWEEP = "bench,llama32k,demo"


@dataclass(frozen=True)
class Entry:
    """An entry of ``--models``: a shape (built on first use) or a model directory."""

    label: str
    """Names the model's figures (``<label>.json``, ``<label>.png``)."""
    shape: Shape | None = None
    path: str = ""


def parse_models(text: str) -> list[Entry]:
    """``--models`` as entries; an unknown name that is no directory is an error naming both."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError(f"--models: give at least one model (shapes: {', '.join(SHAPES)}, or a model directory)")
    entries = [_entry(name) for name in names]
    labels = [e.label for e in entries]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"--models: {', '.join(repeated)} given twice (each model's figures are named by it)")
    return entries


def _entry(name: str) -> Entry:
    if name in SHAPES:
        return Entry(name, shape=SHAPES[name])
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(f"--models: {name!r} is neither a known shape ({', '.join(SHAPES)}) "
                         "nor an existing model directory")
    return Entry(path.resolve().name or "model", path=str(path.resolve()))


def shape_dir(root: Path, shape: Shape) -> Path:
    """Where a shape is cached (the demo shape is the farm's default model directory)."""
    return root / ".farm" / "models" / shape.name


def resolve(entry: Entry, root: Path) -> str:
    """The model directory of ``entry``, building its shape first if it is missing or stale."""
    if entry.shape is None:
        return entry.path
    from ops.make_model import ensure_model

    return str(ensure_model(shape_dir(root, entry.shape), entry.shape.size))
