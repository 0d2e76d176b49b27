"""Static checks of docker-compose.yml and the Dockerfiles: no Docker engine needed."""

from __future__ import annotations

import fnmatch
import importlib.metadata as md
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from flockwatch.arbiter.settings import ArbiterSettings
from flockwatch.cli.main import app
from flockwatch.cli.runtime import ALL, KNOWN
from flockwatch.common import topics
from flockwatch.common.settings import CommonSettings
from flockwatch.feedback.settings import FeedbackSettings
from flockwatch.gateway.settings import GatewaySettings
from flockwatch.trainer.settings import TrainerSettings
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERFILE_REGEX = ROOT / "deploy" / "Dockerfile.regex"
SETTINGS: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "arbiter": ArbiterSettings,
    "feedback": FeedbackSettings,
    "trainer": TrainerSettings,
}
HEAVY = {"torch", "snorkel", "mapie", "transformers", "peft", "bitsandbytes"}
# Imported on the regex voter's path only when installed (by faststream, fast-depends and joblib).
OPTIONAL = {"opentelemetry-sdk", "orjson", "psutil"}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load(COMPOSE.read_text())
    return dict(compose["services"])


def _ours(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services that run a Flockwatch image."""
    return {name: s for name, s in services.items() if str(s.get("image", "")).startswith("flockwatch")}


def _words(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else list(value)


def _argv(service: dict[str, Any]) -> list[str]:
    """The container's command line: the image entrypoint (`flockwatch`) unless overridden, then the command."""
    return _words(service.get("entrypoint", ["flockwatch"])) + _words(service.get("command", []))


def _flockwatch_calls(service: dict[str, Any]) -> list[list[str]]:
    """Every `flockwatch …` invocation in a service's command line (also inside `sh -c`)."""
    words = shlex.split(" ".join(_argv(service)).replace("&&", " && "))
    calls: list[list[str]] = []
    current: list[str] | None = None
    for word in words:
        if word == "flockwatch":
            current = []
            calls.append(current)
        elif word in ("&&", ";", "||"):
            current = None
        elif current is not None:
            current.append(word)
    return calls


def _instructions(path: Path) -> list[tuple[str, str]]:
    """Dockerfile instructions (keyword, arguments), continuation lines joined, comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in joined.splitlines() if ln.strip()]


def _pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every `pip install` in a Dockerfile's RUN instructions."""
    calls = []
    for keyword, args in _instructions(path):
        if keyword == "RUN":
            for part in args.split("&&"):
                words = [w for w in shlex.split(part) if not w.startswith("--mount")]
                if words[:2] == ["pip", "install"]:
                    calls.append(words[2:])
    return calls


def _dockerignored(path: str) -> bool:
    ignored = False
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if pattern and not pattern.startswith("#"):
            negate, glob = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, glob) or path.startswith(glob + "/"):
                ignored = not negate
    return ignored


def _closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements pull in (from the installed metadata)."""
    todo, extras_of = [Requirement(r) for r in requirements], dict[str, set[str]]()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in extras_of and set(req.extras) <= extras_of[name]:
            continue
        extras = extras_of[name] = extras_of.get(name, set()) | set(req.extras)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for dep in map(Requirement, requires):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in {"", *extras}):
                todo.append(dep)
    return set(extras_of)


def test_depends_on_names_existing_services(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name


def test_services_start_after_topics_and_models(services: dict[str, dict[str, Any]]) -> None:
    for name in ALL:
        depends = services[name]["depends_on"]
        assert depends["kafka-init"]["condition"] == "service_completed_successfully"
        assert depends["train"]["condition"] == "service_completed_successfully"


def test_serve_commands_name_real_services(services: dict[str, dict[str, Any]]) -> None:
    served = {call[1] for s in _ours(services).values() for call in _flockwatch_calls(s) if call[0] == "serve"}
    assert served == set(KNOWN)
    for name in KNOWN:
        assert _flockwatch_calls(services[name]) == [["serve", name]]


def test_flockwatch_subcommands_exist(services: dict[str, dict[str, Any]]) -> None:
    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands if c.callback}
    used = {call[0] for s in _ours(services).values() for call in _flockwatch_calls(s)}
    assert used <= commands


def test_env_vars_are_settings_fields(services: dict[str, dict[str, Any]]) -> None:
    known = {
        f"{cls.model_config.get('env_prefix', '')}{field}".upper()
        for cls in (CommonSettings, GatewaySettings, ArbiterSettings, FeedbackSettings, TrainerSettings)
        for field in cls.model_fields
    }
    for name, service in _ours(services).items():
        used = {k for k in service.get("environment", {}) if k.startswith("FLOCKWATCH_")}
        assert used <= known, f"{name}: unknown settings {sorted(used - known)}"


def test_env_values_validate(services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in _ours(services).items():
        with monkeypatch.context() as env:
            for key, value in service.get("environment", {}).items():
                env.setenv(key, str(value))
            settings = SETTINGS.get(name, CommonSettings)(_env_file=None)
            if name in ALL:
                assert settings.bus_scheme == "kafka", name


def test_bus_and_state_urls_point_at_compose_services(services: dict[str, dict[str, Any]]) -> None:
    for name in ALL:
        env = services[name]["environment"]
        for key in ("FLOCKWATCH_BUS_URL", "FLOCKWATCH_STATE_URL"):
            host = urlsplit(env[key]).hostname
            assert host in services, f"{name}: {key} names {host!r}, not a compose service"


def test_trainer_writes_where_the_services_read(services: dict[str, dict[str, Any]]) -> None:
    train = next(call for call in _flockwatch_calls(services["train"]) if call[0] == "train")
    options = dict(zip(train[1::2], train[2::2], strict=False))
    for path in (options["--labels"], options["--rules"]):
        assert (ROOT / path).is_file(), path
    for name in ALL:
        assert services[name]["environment"]["FLOCKWATCH_MODEL_DIR"] == f"{options['--out']}/current"
        assert "models:/models:ro" in services[name]["volumes"]
    assert "models:/models" in services["train"]["volumes"]


def test_kafka_init_creates_every_topic(services: dict[str, dict[str, Any]]) -> None:
    script = " ".join(services["kafka-init"]["command"])
    created = script.split("for topic in", 1)[1].split(";", 1)[0].split()
    assert sorted(created) == sorted(topics.ALL)
    assert "--partitions 6" in script


def test_feedback_service_reaches_the_compose_postgres_and_publishes_its_port(
    services: dict[str, dict[str, Any]],
) -> None:
    feedback = services["feedback"]
    env = feedback["environment"]
    assert urlsplit(env["FLOCKWATCH_FEEDBACK_DATABASE_URL"]).hostname == "postgres"
    assert feedback["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert feedback["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert env["FLOCKWATCH_FEEDBACK_HOST"] == "0.0.0.0"
    assert f"{env['FLOCKWATCH_FEEDBACK_PORT']}:{env['FLOCKWATCH_FEEDBACK_PORT']}" in feedback["ports"]


def test_gateway_listens_on_the_published_port(services: dict[str, dict[str, Any]]) -> None:
    env = services["gateway"]["environment"]
    assert env["FLOCKWATCH_GATEWAY_HOST"] == "0.0.0.0"
    assert f"{env['FLOCKWATCH_GATEWAY_PORT']}:{env['FLOCKWATCH_GATEWAY_PORT']}" in services["gateway"]["ports"]


def test_build_dockerfiles_exist(services: dict[str, dict[str, Any]]) -> None:
    builds = [s["build"] for s in services.values() if "build" in s]
    assert builds
    for build in builds:
        assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    assert services["regex_voter"]["build"]["dockerfile"] == "deploy/Dockerfile.regex"


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, DOCKERFILE_REGEX], ids=lambda p: p.name)
def test_copy_sources_exist_and_reach_the_build_context(dockerfile: Path) -> None:
    for keyword, args in _instructions(dockerfile):
        words = args.split()
        if keyword in ("COPY", "ADD") and not any(w.startswith("--from") for w in words):
            for source in [w for w in words if not w.startswith("--")][:-1]:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
                assert not _dockerignored(source), f"{dockerfile.name}: {source} is excluded by .dockerignore"


def test_main_image_installs_cpu_torch_before_the_project() -> None:
    installs = _pip_installs(DOCKERFILE)
    assert installs[0][:1] == ["torch==2.13.0"] and "https://download.pytorch.org/whl/cpu" in installs[0]
    assert ["."] in installs[1:]


def test_regex_image_installs_no_torch() -> None:
    installs = _pip_installs(DOCKERFILE_REGEX)
    requirements = [w for call in installs for w in call if not w.startswith("-") and w != "."]
    assert not {canonicalize_name(Requirement(r).name) for r in requirements} & HEAVY
    assert ["--no-deps", "."] in installs, "the project must go in without its (torch-pulling) dependencies"


def test_regex_image_covers_what_the_regex_voter_imports() -> None:
    probe = (
        "import sys, json, importlib.metadata as md\n"
        "import flockwatch.cli.main, flockwatch.cli.runtime, flockwatch.common.bus_faststream\n"
        "from flockwatch.cli.runtime import build\n"
        "from flockwatch.common.settings import CommonSettings\n"
        "build(['regex_voter'], CommonSettings(bus_url='kafka://kafka:9092', _env_file=None))\n"
        "names = md.packages_distributions()\n"
        "print(json.dumps(sorted({d for m in list(sys.modules) for d in names.get(m.split('.')[0], [])})))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    imported = {canonicalize_name(d) for d in json.loads(out.stdout)}
    assert not imported & HEAVY, f"the regex voter's path imports {sorted(imported & HEAVY)}"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    direct = {canonicalize_name(Requirement(r).name) for r in declared} & imported
    installs = _pip_installs(DOCKERFILE_REGEX)
    listed = [w for call in installs for w in call if not w.startswith("-") and w != "."]
    missing = direct - _closure(listed) - OPTIONAL
    assert not missing, f"deploy/Dockerfile.regex misses {sorted(missing)}"


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed (`docker compose config` needs no engine)")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
