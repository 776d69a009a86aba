"""``docker-compose.yml``, ``.env.example`` and the ``Dockerfile`` checked against the code.

No Docker engine (nor the compose plugin) runs on these machines, so ``docker compose config``
cannot be asked. Instead the file is parsed with PyYAML, interpolated the way compose does with
``.env.example``, and every service's command, environment, ports and volumes are checked
against the farm's own settings and CLI.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops.cli import COMMANDS
from ops.flower import _parser as flower_parser
from ops.flower import check_auth
from protocol.settings import FarmSettings
from tests.conftest import ROOT
from worker.main import _parser as worker_parser

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SETTING_VARS = {"FARM_" + f.name.upper() for f in dataclasses.fields(FarmSettings)}
VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` with ``$$`` as a literal ``$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise AssertionError(f"{name} is required: {arg}")
        return arg or ""

    return VARIABLE.sub(one, value.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    """The file as compose sees it with ``.env.example`` as ``.env`` (anchors resolved by YAML)."""
    return interpolate(raw, env_example())


def farm_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if s.get("build")}


def workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if name.startswith("worker-")}


def test_every_variable_the_file_needs_is_in_env_example(raw: dict[str, Any]) -> None:
    needed = {m["name"] for m in VARIABLE.finditer(COMPOSE.read_text()) if (m["op"] or "").endswith("?")}
    missing = needed - {k for k, v in env_example().items() if v}
    assert not missing, f"required by docker-compose.yml but empty or absent in .env.example: {missing}"
    used = {m["name"] for m in VARIABLE.finditer(COMPOSE.read_text())}
    assert not set(env_example()) - used, "variables in .env.example that docker-compose.yml never reads"


def test_services_of_the_farm(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "flower", "ui"} <= set(services)
    assert len(workers(compose)) >= 1
    for name, service in farm_services(compose).items():
        assert (ROOT / service["build"] / "Dockerfile").is_file(), name
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name


def test_commands_are_farm_commands_with_valid_options(compose: dict[str, Any]) -> None:
    for name, service in farm_services(compose).items():
        command = service["command"]
        assert command[0] in COMMANDS, (name, command)
        if command[0] == "worker":
            worker_parser().parse_args(command[1:])
        elif command[0] == "flower":
            flower_parser(FarmSettings()).parse_args(command[1:])
        elif command[0] == "make-model":
            assert command[1].startswith("/models/") and command[2:] == ["--size", "demo"]
    ui_help = subprocess.run([sys.executable, "-m", "ops.cli", "ui", "--help"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    ui_options = [arg for arg in compose["services"]["ui"]["command"][1:] if arg.startswith("--")]
    assert ui_options and all(option in ui_help.stdout for option in ui_options), ui_help.stdout


def test_environment_is_farm_settings_that_validate(compose: dict[str, Any]) -> None:
    for name, service in farm_services(compose).items():
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        unknown = {k for k in env if k.startswith("FARM_")} - SETTING_VARS
        assert not unknown, (name, unknown)
        if name != "model":
            settings = FarmSettings.from_env(env)  # raises on a bad value
            assert settings.redis_url.startswith("redis://:") and "@redis:6379/" in settings.redis_url, name


def test_redis_has_a_password_append_only_and_a_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    password = command[command.index("--requirepass") + 1]
    assert password and command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") and v.split(":")[0] in compose["volumes"] for v in redis["volumes"])
    for name, service in farm_services(compose).items():
        url = service.get("environment", {}).get("FARM_REDIS_URL")
        assert url is None or url == f"redis://:{password}@redis:6379/0", name
    assert redis["ports"] == ["127.0.0.1:6379:6379"]  # loopback unless REDIS_BIND says otherwise


def test_one_worker_per_gpu_pinned_by_reservation(compose: dict[str, Any]) -> None:
    names = set()
    for name, service in workers(compose).items():
        env = service["environment"]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["capabilities"] == ["gpu"] and len(devices[0]["device_ids"]) == 1
        gpu = devices[0]["device_ids"][0]
        assert name == f"worker-gpu{gpu}" and env["FARM_WORKER_NAME"].startswith(f"gpu{gpu}@")
        # The container sees only its reserved GPU, as device 0.
        assert env["CUDA_VISIBLE_DEVICES"] == "0" and service["command"][1:3] == ["--device", "cuda:0"]
        names.add(env["FARM_WORKER_NAME"])
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert len(names) == len(workers(compose))


def _published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    out = []
    for port in service.get("ports", []):
        host, published, target = str(port).rsplit(":", 2) if str(port).count(":") >= 2 else ("", *port.split(":"))
        out.append((host, int(published), int(target)))
    return out


def test_ports_match_the_settings_each_service_listens_on(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in workers(compose).items():
        env = service["environment"]
        port = int(env["FARM_METRICS_PORT"])
        assert env["FARM_METRICS_HOST"] == "0.0.0.0"  # reachable through the published port
        assert _published(service) == [("127.0.0.1", port, port)], name
    flower = flower_parser(FarmSettings()).parse_args(services["flower"]["command"][1:])
    assert _published(services["flower"]) == [("127.0.0.1", flower.port, flower.port)]
    check_auth(flower.address, services["flower"]["environment"]["FARM_FLOWER_AUTH"])
    ui = services["ui"]["command"]
    ui_port = int(ui[ui.index("--port") + 1])
    assert _published(services["ui"]) == [("127.0.0.1", ui_port, ui_port)]
    assert ui_port == FarmSettings().ui_port and flower.port == FarmSettings().flower_port


def test_flower_without_auth_is_refused_by_compose_itself(raw: dict[str, Any]) -> None:
    env = {k: v for k, v in env_example().items() if k != "FARM_FLOWER_AUTH"}
    with pytest.raises(AssertionError, match="FARM_FLOWER_AUTH is required"):
        interpolate(raw, env)


def test_model_volume_holds_the_model_the_workers_load(compose: dict[str, Any]) -> None:
    model_dir = compose["services"]["model"]["command"][1]
    for name, service in [*workers(compose).items(), ("model", compose["services"]["model"])]:
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts.get("/models") == "models", name
        assert all(source in compose["volumes"] for source in mounts.values()), name
        if name != "model":
            assert service["environment"]["FARM_MODEL"] == model_dir
            assert service["depends_on"]["model"]["condition"] == "service_completed_successfully"


def test_dockerfile_runs_the_farm_cli_as_a_user() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "ops.cli"]' in text
    assert "COPY requirements.txt" in text and "pip install -r requirements.txt" in text
    assert re.search(r"^USER farm$", text, re.M)
    copied = set(re.findall(r"^COPY (\w+) \1$", text, re.M))
    needed = {m.split(".")[0] for m, _ in COMMANDS.values()} - {"bench"}
    assert needed <= copied, needed - copied
    assert all((ROOT / name).is_dir() for name in copied)
    assert Path(ROOT / ".dockerignore").read_text().count(".farm") == 1
