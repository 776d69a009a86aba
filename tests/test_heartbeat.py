"""The heartbeat schema (``protocol/heartbeat.py``) and the worker's record: pure, no Redis, no torch."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field, replace

import pytest

from protocol.heartbeat import (HEARTBEAT_VERSION, BatchStat, HeartbeatError, WorkerHeartbeat,
                                busy_tokens_per_second, public_model_name, read_heartbeats)
from worker.heartbeat import heartbeat_record

FULL = WorkerHeartbeat(
    name="gpu0@a", host="a", pid=42, device="cuda:0", cuda_visible_devices="1", model_name="demo",
    model_path="/m/demo", quant="int8", packed_layers=3, adapters=("base", "default"), strategy="continuous",
    max_batch_size=16, queues=("interactive", "bulk"), metrics_port=9401, state="ready", load_seconds=2.5,
    started_at=10.0, updated_at=20.0, batches=3, requests=12, failed=1, tokens=300, oom_splits=1, running=4,
    waiting=2, in_flight=6, mean_batch_size=4.0, tokens_per_second=150.0,
    recent_batches=(BatchStat(19.0, 4, 100, 0.5),), queue_wait_seconds=0.25, first_token_seconds=0.125,
    decode_seconds_per_token=0.0125)


def test_every_field_round_trips_through_json() -> None:
    assert WorkerHeartbeat.parse(FULL.to_json()) == FULL
    assert WorkerHeartbeat.parse(WorkerHeartbeat().to_json()) == WorkerHeartbeat()


def test_json_form_keeps_the_fields_older_readers_index() -> None:
    data = json.loads(FULL.to_json())
    assert data["version"] == HEARTBEAT_VERSION
    assert (data["ready"], data["model"], data["adapters"]) == (True, "/m/demo", ["base", "default"])
    assert data["recent_batches"] == [{"at": 19.0, "size": 4, "tokens": 100, "seconds": 0.5}]


def test_unknown_fields_of_a_newer_worker_are_ignored() -> None:
    newer = {**FULL.to_dict(), "version": HEARTBEAT_VERSION + 1, "gpu_memory": {"used": 3},
             "recent_batches": [{"at": 1.0, "size": 2, "tokens": 8, "seconds": 0.5, "kv_blocks": 7}]}
    beat = WorkerHeartbeat.parse(json.dumps(newer))
    assert beat.version == HEARTBEAT_VERSION + 1 and beat.name == "gpu0@a"
    assert beat.recent_batches == (BatchStat(1.0, 2, 8, 0.5),)


def test_a_record_from_before_the_schema_reads_with_defaults() -> None:
    old = {"name": "cpu@b", "device": "cpu", "model": "/models/tiny", "quant": "none", "ready": True,
           "adapters": ["base"], "batches": 2, "tokens_per_second": 9.5, "updated_at": 5.0}
    beat = WorkerHeartbeat.parse(json.dumps(old))
    assert (beat.version, beat.state, beat.ready) == (0, "ready", True)
    assert (beat.model_path, beat.model_name) == ("/models/tiny", "tiny")
    assert (beat.queues, beat.metrics_port, beat.first_token_seconds, beat.running) == ((), None, None, 0)
    assert WorkerHeartbeat.parse(json.dumps({**old, "ready": False})).state == "loading"


@pytest.mark.parametrize(("raw", "message"), [
    ("{not json", "not json"),
    (b"\xff\xfe", "not json"),
    ("[1, 2]", "must be a json object, got list"),
    ('{"batches": "three"}', "batches must be int"),
    ('{"ready": true, "state": 3}', "state must be str"),
    ('{"adapters": "base"}', "adapters must be a list"),
    ('{"recent_batches": [{"at": "now"}]}', "recent_batches.at must be float"),
    ('{"first_token_seconds": true}', "first_token_seconds must be float"),
])
def test_a_bad_record_is_refused_naming_the_field(raw: str | bytes, message: str) -> None:
    with pytest.raises(HeartbeatError, match=message):
        WorkerHeartbeat.parse(raw)


def test_numbers_are_read_whatever_json_made_of_them() -> None:
    beat = WorkerHeartbeat.parse('{"load_seconds": 3, "batches": 4.0, "first_token_seconds": null}')
    assert (beat.load_seconds, beat.batches, beat.first_token_seconds) == (3.0, 4, None)
    assert isinstance(beat.load_seconds, float) and isinstance(beat.batches, int)


def test_reading_many_leaves_out_expired_and_unreadable_records() -> None:
    beats = read_heartbeats([FULL.to_json().encode(), None, b"garbage", b'{"name": "x"}'])
    assert [b.name for b in beats] == ["gpu0@a", "x"]


def test_public_model_name_is_the_hub_id_or_the_directory_name() -> None:
    assert public_model_name("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert public_model_name("/srv/models/demo/") == "demo"
    assert public_model_name("models/demo", local=True) == "demo"


def test_tokens_per_second_counts_busy_time_only() -> None:
    # two 0.5 s batches, 20 s apart: 150 tokens in 1 s of work, not in 20.5 s
    batches = [BatchStat(at=100.0, size=1, tokens=100, seconds=0.5), BatchStat(at=120.0, size=1, tokens=50,
                                                                                seconds=0.5)]
    assert busy_tokens_per_second(batches, now=121.0) == 150.0
    assert busy_tokens_per_second(batches, now=170.0) == 100.0  # the first left the minute
    assert busy_tokens_per_second(batches, now=500.0) == 0.0
    assert BatchStat(tokens=10, seconds=0.0).tokens_per_second == 0.0


@dataclass
class _Batch:
    at: float
    size: int
    tokens: int
    seconds: float


@dataclass
class _Stats:
    batches: int = 0
    requests: int = 0
    failed: int = 0
    tokens: int = 0
    oom_splits: int = 0
    recent: deque[_Batch] = field(default_factory=deque)


@dataclass
class _Engine:
    """The engine's counters as the heartbeat reads them (the seam: no model behind it)."""

    stats: _Stats
    running: int = 0
    waiting: int = 0


def test_worker_record_adds_the_engine_load_to_its_identity() -> None:
    # 140 batches every 0.5 s, the last 40 of them twice as fast: 120 in the last minute
    recent = deque(_Batch(1000.0 + i / 2, 2, 20 if i < 100 else 40, 0.25) for i in range(140))
    engine = _Engine(_Stats(batches=140, requests=280, recent=recent), running=2, waiting=5)
    identity = replace(FULL, batches=0, recent_batches=(), tokens_per_second=0.0)
    beat = heartbeat_record(identity, engine, ["base", "late"], now=1070.0)  # type: ignore[arg-type]
    assert (beat.name, beat.model_name, beat.adapters, beat.updated_at) == ("gpu0@a", "demo", ("base", "late"), 1070.0)
    assert (beat.batches, beat.running, beat.waiting, beat.mean_batch_size) == (140, 2, 5, 2.0)
    assert beat.tokens_per_second == pytest.approx((80 * 20 + 40 * 40) / (120 * 0.25))  # not only the 64 sent
    assert len(beat.recent_batches) == 64 and beat.recent_batches[-1] == BatchStat(1069.5, 2, 40, 0.25)
