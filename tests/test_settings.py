"""Settings from FARM_* variables."""

from __future__ import annotations

import pytest

from protocol.errors import SettingsError
from protocol.settings import FarmSettings, redact_url


def test_reads_typed_values_from_env() -> None:
    s = FarmSettings.from_env({"FARM_MAX_BATCH_SIZE": "8", "FARM_MAX_WAIT_MS": "2.5", "FARM_QUANT": "int8",
                               "FARM_REDIS_URL": "redis://h:1/2", "UNRELATED": "x"})
    assert (s.max_batch_size, s.max_wait_ms, s.quant, s.redis_url) == (8, 2.5, "int8", "redis://h:1/2")


@pytest.mark.parametrize(("env", "message"), [
    ({"FARM_QUANT": "int4"}, "FARM_QUANT='int4' is not one of none, int8, nf4"),
    ({"FARM_MAX_BATCH_SIZE": "many"}, "FARM_MAX_BATCH_SIZE='many' is not an integer"),
    ({"FARM_MAX_BATCH_SIZE": "0"}, "FARM_MAX_BATCH_SIZE must be at least 1"),
    ({"FARM_ADAPTERS": "justapath"}, "is not name=path"),
    ({"FARM_ADAPTERS": "base=/x"}, "reserved for the base model"),
])
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        FarmSettings.from_env(env)


def test_adapters_by_name() -> None:
    s = FarmSettings.from_env({"FARM_ADAPTER": "/a", "FARM_ADAPTERS": "x=/x, y=/y"})
    assert s.adapter_paths() == {"default": "/a", "x": "/x", "y": "/y"}
    assert s.adapter_names() == ["base", "default", "x", "y"]


def test_redacts_passwords() -> None:
    assert redact_url("redis://:secret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://user:secret@h/0") == "redis://user:***@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert "secret" not in FarmSettings(redis_url="redis://:secret@h/0").redacted_redis_url()
