"""Routing by model, pure parts: names, settings, request validation, the catalog, ``farm up --model``."""

from __future__ import annotations

import pytest

from ops.up import FarmUpError, model_worker_specs, parse_models, plan_gpus
from protocol.errors import NoWorkerError, RequestError, SettingsError
from protocol.heartbeat import WorkerHeartbeat
from protocol.models import Catalog, ServedModel, served_models
from protocol.names import model_queue, model_queues, queue_priority
from protocol.schema import GenerationRequest, Limits
from protocol.settings import FarmSettings

LIMITS = Limits(models={"demo": ("base", "pirate"), "tiny": ("base",)}, adapters=("base", "pirate"))


def beat(name: str, model: str, adapters: tuple[str, ...] = ("base",)) -> WorkerHeartbeat:
    return WorkerHeartbeat(name=name, model_name=model, adapters=adapters, queues=model_queues(model),
                           state="ready", updated_at=100.0)


def test_queue_names_per_model_in_priority_order() -> None:
    assert model_queue("interactive", "demo") == "interactive.demo"
    assert model_queue("bulk", None) == "bulk"
    assert model_queues("demo") == ("interactive.demo", "bulk.demo")
    assert model_queues("demo", plain=True) == ("interactive.demo", "interactive", "bulk.demo", "bulk")
    assert [queue_priority(q) for q in ("interactive.demo", "bulk.demo", "interactive", "bulk")] == [0, 1, 0, 1]


def test_the_served_name_is_the_setting_or_the_last_part_of_the_model() -> None:
    assert FarmSettings(model="/srv/models/demo/").served_model_name() == "demo"
    assert FarmSettings(model="meta-llama/Llama-2-7b-hf").served_model_name() == "Llama-2-7b-hf"
    assert FarmSettings(model="meta-llama/Llama-2-7b-hf", model_name="llama7").served_model_name() == "llama7"
    with pytest.raises(SettingsError, match="FARM_MODEL_NAME='a:b' is not a model name"):
        FarmSettings(model_name="a:b")
    assert FarmSettings(model_name="a").takes_unnamed()
    assert FarmSettings(model_name="a", default_model="a").takes_unnamed()
    assert not FarmSettings(model_name="b", default_model="a").takes_unnamed()


def test_a_request_names_its_model_and_maybe_an_adapter() -> None:
    request = GenerationRequest.from_dict({"prompt": "x", "model": "demo:pirate"}, LIMITS)
    assert (request.model, request.adapter) == ("demo", "pirate")
    assert request.to_dict()["model"] == "demo"
    assert "model" not in GenerationRequest.from_dict({"prompt": "x"}, Limits()).to_dict()  # as before
    with pytest.raises(RequestError, match=r"model: unknown model 'big' \(served: demo, tiny\)"):
        GenerationRequest.from_dict({"prompt": "x", "model": "big"}, LIMITS)
    with pytest.raises(RequestError, match="adapter: unknown adapter 'pirate' \\(offered: base\\)"):
        GenerationRequest.from_dict({"prompt": "x", "model": "tiny:pirate"}, LIMITS)
    with pytest.raises(RequestError, match="adapter: 'base' is not the adapter 'pirate' named in model"):
        GenerationRequest.from_dict({"prompt": "x", "model": "demo:pirate", "adapter": "base"}, LIMITS)
    for bad in ("", "a/b", "demo:", 3):
        with pytest.raises(RequestError, match="^model: "):
            GenerationRequest.from_dict({"prompt": "x", "model": bad}, LIMITS)


def test_a_request_without_a_model_goes_to_the_default() -> None:
    with pytest.raises(RequestError, match=r"model: several models are served \(demo, tiny\): name one"):
        GenerationRequest.from_dict({"prompt": "x"}, LIMITS)
    defaulted = Limits(models=LIMITS.models, default_model="tiny")
    assert GenerationRequest.from_dict({"prompt": "x"}, defaulted).model == "tiny"
    with pytest.raises(RequestError, match="the default model 'gone' \\(FARM_DEFAULT_MODEL\\) is not served"):
        GenerationRequest.from_dict({"prompt": "x"}, Limits(models=LIMITS.models, default_model="gone"))
    assert GenerationRequest.from_dict({"prompt": "x"}, Limits(models={"demo": ()})).model is None  # plain queues


def test_the_catalog_groups_workers_by_model_and_remembers_models_whose_workers_left() -> None:
    beats = (beat("a@h", "demo", ("base", "pirate")), beat("b@h", "demo"), beat("c@h", "tiny"), beat("old@h", ""))
    models = served_models(beats)
    assert [(m.name, m.workers, m.adapters) for m in models] == [
        ("demo", ("a@h", "b@h"), ("base", "pirate")), ("tiny", ("c@h",), ("base",))]
    assert models[0].ids() == ["demo", "demo:pirate"]
    record = ServedModel.parse(ServedModel("gone", ("base",), ("x@h",), ("bulk.gone",), 5.0).record())
    assert record == ServedModel("gone", ("base",), (), ("bulk.gone",), 5.0)
    assert ServedModel.parse(b"not json") is None and ServedModel.parse(b'{"adapters": []}') is None
    catalog = Catalog(beats, (record,))
    limits = catalog.limits(FarmSettings(default_model="demo"))
    assert (sorted(limits.models or {}), limits.default_model) == (["demo", "gone", "tiny"], "demo")
    gone = GenerationRequest.from_dict({"prompt": "x", "model": "gone"}, limits)
    catalog.check_served(gone, "bulk")  # bulk rows wait for the model's workers
    with pytest.raises(NoWorkerError, match="no worker serves model gone; models served now: demo, tiny"):
        catalog.check_served(gone, "interactive")
    assert Catalog().limits(FarmSettings()).models is None  # nothing known: names are not checked


def test_the_worker_info_metric_carries_the_model_name() -> None:
    from prometheus_client import generate_latest

    from worker.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    metrics.describe(beat("a@h", "demo").to_dict())
    assert 'model_name="demo"' in generate_latest(metrics.registry).decode()


def test_farm_up_models_become_worker_groups() -> None:
    pairs = parse_models(["demo=/m/demo", "tiny=/m/tiny"])
    specs = model_worker_specs(pairs, plan_gpus("all", 2, "h"), {"FARM_WORKER_NAME": "x", "FARM_ADAPTER": "/a"},
                               9400, "info")
    assert [s.name for s in specs] == ["demo-gpu0@h", "demo-gpu1@h", "tiny-gpu0@h", "tiny-gpu1@h"]
    assert [s.env["FARM_METRICS_PORT"] for s in specs] == ["9400", "9401", "9402", "9403"]
    assert [(s.env["FARM_MODEL_NAME"], s.env["FARM_MODEL"]) for s in specs][1:3] == [("demo", "/m/demo"),
                                                                                     ("tiny", "/m/tiny")]
    assert all("FARM_ADAPTER" not in s.env for s in specs)  # an adapter belongs to one base model
    for bad, message in ((["demo"], "give NAME=PATH"), (["a:b=/m"], "not a model name"),
                         (["a=/m", "a=/n"], "given twice")):
        with pytest.raises(FarmUpError, match=message):
            parse_models(bad)
