"""Static checks of docker/: no Docker engine here, so a wrong name or port would otherwise only show at deploy time."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from ls_backend.settings import Settings

DOCKER = Path(__file__).resolve().parents[1] / "docker"
SERVICES = ("label-studio", "backend", "worker", "redis")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, list[str]]:
    """Each Dockerfile instruction's arguments, in order, with continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.setdefault(word.upper(), []).append(rest.strip())
    return found


def environment(service: dict) -> dict[str, str]:
    """A service's environment whether written as a mapping or as a list of NAME=value."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command(value: str | list[str]) -> list[str]:
    """A compose command or Dockerfile CMD as argv, from either the exec or the shell form."""
    if isinstance(value, list):
        return [str(v) for v in value]
    value = value.strip()
    return json.loads(value) if value.startswith("[") else shlex.split(value)


def dockerfile_env(dockerfile: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in dockerfile.get("ENV", []):
        for pair in shlex.split(args):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def test_the_four_services_exist(compose: dict) -> None:
    assert set(SERVICES) <= set(compose["services"])


def test_backend_publishes_9090(compose: dict) -> None:
    ports = [str(p) for p in compose["services"]["backend"]["ports"]]
    assert any(p.split(":")[-1].split("/")[0] == "9090" for p in ports), ports


def test_backend_and_worker_share_models_volume_at_model_dir(compose: dict, dockerfile: dict) -> None:
    mounts = {}
    for name in ("backend", "worker"):
        service = compose["services"][name]
        model_dir = environment(service).get("MODEL_DIR") or dockerfile_env(dockerfile)["MODEL_DIR"]
        volumes = [str(v).split(":") for v in service.get("volumes", [])]
        mounts[name] = {source for source, target, *_ in volumes if target == model_dir}
        assert mounts[name], f"{name} has no volume at its MODEL_DIR {model_dir}"
        assert all(source in (compose.get("volumes") or {}) for source in mounts[name]), "use a named volume"
    assert mounts["backend"] & mounts["worker"]


@pytest.mark.parametrize("name", ["backend", "worker"])
def test_every_variable_is_a_real_setting(compose: dict, name: str) -> None:
    known = {field.upper() for field in Settings.model_fields}
    unknown = set(environment(compose["services"][name])) - known
    assert not unknown, f"{name} sets variables the backend never reads: {sorted(unknown)}"


@pytest.mark.parametrize("name", ["backend", "worker"])
def test_redis_url_points_at_redis_service(compose: dict, name: str) -> None:
    url = urlsplit(environment(compose["services"][name])["REDIS_URL"])
    assert url.scheme == "redis" and url.hostname == "redis" and (url.port or 6379) == 6379


@pytest.mark.parametrize("name", ["backend", "worker"])
def test_label_studio_url_points_at_label_studio(compose: dict, name: str) -> None:
    url = urlsplit(environment(compose["services"][name])["LABEL_STUDIO_URL"])
    container_ports = [str(p).split(":")[-1].split("/")[0] for p in compose["services"]["label-studio"]["ports"]]
    assert url.hostname == "label-studio"
    assert str(url.port or 80) in container_ports, "LABEL_STUDIO_URL must use the port LS listens on in its container"


def test_worker_runs_the_rq_worker(compose: dict) -> None:
    argv = command(compose["services"]["worker"]["command"])
    assert argv[argv.index("-m") + 1] == "ls_backend.worker"


def test_dockerfile_runs_the_server_on_the_exposed_port(dockerfile: dict) -> None:
    argv = command(dockerfile["CMD"][-1])
    assert argv[argv.index("-m") + 1] == "ls_backend"
    exposed = {p.split("/")[0] for args in dockerfile["EXPOSE"] for p in args.split()}
    assert exposed == {dockerfile_env(dockerfile)["PORT"]}
    assert dockerfile_env(dockerfile)["HOST"] == "0.0.0.0"


@pytest.mark.parametrize("name", ["BASIC_AUTH_USER", "BASIC_AUTH_PASS"])
def test_backend_credentials_are_required_from_the_environment(compose: dict, name: str) -> None:
    """The backend listens on 0.0.0.0 in its container: `docker compose up` must fail without the pair."""
    value = environment(compose["services"]["backend"])[name]
    assert re.fullmatch(r"\$\{" + name + r":?\?[^}]+\}", value), f"{name} should be ${{{name}:?message}}, not {value!r}"
