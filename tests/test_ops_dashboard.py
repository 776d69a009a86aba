"""The Grafana dashboard (``ops/grafana-dashboard.json``) and the docs name only metrics that
really exist: every name and label in every panel's expressions is one the worker's, the API's or
Flower's ``/metrics`` exports. Each source's names come from its own code (its registry, fed once
so that labelled series appear), not from a list kept here."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import ApiMetrics, Observation
from protocol.schema import GenerationResult
from worker.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "ops" / "grafana-dashboard.json"
DOCS = (ROOT / "ops" / "README.md", ROOT / "README.md", ROOT / "docs" / "DESIGN.md")
METRIC = re.compile(r"(?<![\w$])(?:farm|flower)_[a-z_]+")
SCRAPE_LABELS = {"job", "instance"}
"""Labels Prometheus adds to every series it scrapes."""


def worker_exposition() -> str:
    metrics = WorkerMetrics()
    metrics.describe({"name": "w"})
    metrics.observe_result(GenerationResult(id="a", completion_tokens=3, batch_size=1, first_token_seconds=0.1,
                                            generate_seconds=0.3))
    return _text(metrics.registry)


def api_exposition() -> str:
    metrics = ApiMetrics()
    answered = Observation(metrics, "/v1/chat/completions", "tiny")
    answered.first_byte()
    answered.done(200)
    Observation(metrics, "/v1/completions").done(404, "model_not_found")
    return metrics.render().decode()


def flower_exposition() -> str:
    """Flower's own metrics, fed a worker coming online and a task's events as Flower's events
    thread feeds them (Flower registers them in the process's default registry)."""
    from flower.events import EventsState

    state, now = EventsState(), time.time()
    state.event({"type": "worker-online", "hostname": "w@h", "timestamp": now, "local_received": now, "clock": 1})
    for clock, kind in enumerate(("task-received", "task-started", "task-succeeded", "task-failed"), 2):
        state.event({"type": kind, "hostname": "w@h", "uuid": f"t-{kind}", "timestamp": now, "local_received": now,
                     "clock": clock, "runtime": 0.5, "name": "batchfarm.generate"})
    return _text(REGISTRY)


def _text(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def exported() -> dict[str, set[str]]:
    """Each sample name exported by the worker, the API or Flower, with its label names."""
    names: dict[str, set[str]] = {}
    for text in (worker_exposition(), api_exposition(), flower_exposition()):
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels)
    return names


def expressions() -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every target of every panel (rows hold no targets)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def labels_used(expr: str) -> set[str]:
    """Label names an expression groups by or matches on."""
    grouped = {name.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for name in group.split(",")}
    matched = set(re.findall(r"[{,]\s*([a-z_]+)\s*(?:=~|!~|!=|=)", expr))
    return (grouped | matched) - {""}


def test_every_panel_names_metrics_and_labels_that_are_exported() -> None:
    names = exported()
    for title, expr in expressions():
        metrics = METRIC.findall(expr)
        assert metrics, (title, expr)
        missing = [m for m in metrics if m not in names]
        assert not missing, (title, missing)
        labels = set().union(*(names[m] for m in metrics)) | SCRAPE_LABELS
        assert labels_used(expr) <= labels, (title, labels_used(expr) - labels)
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), (title, expr)


def test_the_dashboard_covers_the_worker_the_api_and_flower() -> None:
    used = {m for _, expr in expressions() for m in METRIC.findall(expr)}
    api = {m for m in used if m.startswith("farm_api_")}
    assert {"farm_api_requests_total", "farm_api_errors_total", "farm_api_request_seconds_bucket",
            "farm_api_first_byte_seconds_bucket"} <= api, api
    assert len(used - api) >= 10 and any(m.startswith("flower_") for m in used), used
    by = {label for _, expr in expressions() if "farm_api_" in expr for label in labels_used(expr)}
    assert {"endpoint", "model", "status", "code"} <= by, by
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    templated = {v["name"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert {v for _, expr in expressions() for v in re.findall(r"\$(\w+)", expr)} <= templated


def test_docs_name_only_exported_metrics() -> None:
    names = exported()
    families = {re.sub(r"_(bucket|count|sum|info)$", "", n) for n in names}
    for doc in DOCS:
        named = set(METRIC.findall(doc.read_text()))
        missing = {n for n in named if n not in names and n not in families}
        assert not missing, (doc, missing)
    assert len(set(METRIC.findall(DOCS[0].read_text()))) >= 16
