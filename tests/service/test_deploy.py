"""docker-compose.yml and deploy/: Docker cannot run here, so check that everything they refer to
exists: files, Dockerfile sources, commands of the ``hoverserve`` CLI and settings variables."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from service.cli import build_parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SETTINGS_VARS = {f"HOVERSERVE_{name.upper()}" for name in Settings.model_fields}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


def _dockerfile_cmd(text: str) -> list[str]:
    match = re.findall(r"^CMD\s+(\[.*\])\s*$", text, flags=re.M)
    assert match, "no exec-form CMD"
    return yaml.safe_load(match[-1])


def _check_hoverserve(argv: list[str]) -> None:
    assert argv[0] == "hoverserve", argv
    build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown command or option


def test_compose_has_api_workers_redis_and_s3(compose: dict) -> None:
    services = compose["services"]
    assert {"api", "worker", "worker-gpu", "redis", "s3"} <= set(services)
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert "gpu" in services["worker-gpu"]["profiles"]


def test_every_build_and_file_exists(compose: dict) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            context = ROOT / service["build"]["context"]
            assert context.is_dir(), name
            assert (context / service["build"]["dockerfile"]).is_file(), name
        env_files = service.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            assert (ROOT / env_file).is_file(), (name, env_file)
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)


def test_every_command_is_a_hoverserve_command(compose: dict) -> None:
    for name, service in compose["services"].items():
        command = service.get("command")
        if command and command[0] == "hoverserve":
            _check_hoverserve(command)
        elif "build" not in service:
            assert "image" in service, name


def test_dockerfiles_copy_existing_sources_and_run_hoverserve() -> None:
    dockerfiles = sorted((ROOT / "deploy").glob("Dockerfile.*"))
    assert {p.name for p in dockerfiles} >= {"Dockerfile.api", "Dockerfile.worker-cpu",
                                              "Dockerfile.worker-gpu"}
    for dockerfile in dockerfiles:
        text = dockerfile.read_text()
        for line in re.findall(r"^COPY\s+(.+)$", text, flags=re.M):
            *sources, _ = shlex.split(line)
            for source in sources:
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), (dockerfile.name, source)
        _check_hoverserve(_dockerfile_cmd(text))
    assert "onnxruntime-gpu" in (ROOT / "deploy" / "Dockerfile.worker-gpu").read_text()


def test_every_environment_variable_is_a_setting(compose: dict) -> None:
    names = set(_env_file(ROOT / "deploy" / "hoverserve.env.example"))
    for service in compose["services"].values():
        names |= {k for k in service.get("environment", {}) if k.startswith("HOVERSERVE_")}
    for dockerfile in (ROOT / "deploy").glob("Dockerfile.*"):
        names |= set(re.findall(r"\b(HOVERSERVE_[A-Z_]+)=", dockerfile.read_text()))
    assert names, "no settings found"
    assert names <= SETTINGS_VARS, names - SETTINGS_VARS
    assert {"HOVERSERVE_STORE", "HOVERSERVE_REDIS_URL", "HOVERSERVE_API_KEYS"} <= names


def test_the_example_env_file_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _env_file(ROOT / "deploy" / "hoverserve.env.example").items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.store.startswith("s3://")
    assert settings.store_options["endpoint_url"] == "http://s3:8333"
    assert settings.key_digests == frozenset()
