"""Static checks of docker-compose.yml and the Dockerfiles: no Docker engine needed."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata as md
import json
import re
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
from flockwatch.classical_voter.settings import EmbeddingSettings
from flockwatch.cli.main import app
from flockwatch.cli.runtime import ALL, KNOWN
from flockwatch.common import telemetry, topics
from flockwatch.common.settings import CommonSettings
from flockwatch.feedback import telemetry as feedback_telemetry
from flockwatch.feedback.settings import FeedbackSettings
from flockwatch.gateway.settings import GatewaySettings
from flockwatch.llm_voter.config import LoraConfig
from flockwatch.llm_voter.settings import LLMSettings
from flockwatch.trainer.settings import TrainerSettings
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client import Counter, Gauge, Histogram
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERFILE_SLIM = ROOT / "deploy" / "Dockerfile.slim"
REQUIREMENTS = ROOT / "deploy" / "requirements"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "flockwatch.json"
SETTINGS: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "arbiter": ArbiterSettings,
    "feedback": FeedbackSettings,
    "trainer": TrainerSettings,
    "llm_voter": LLMSettings,
    "embedding_voter": EmbeddingSettings,
}
HTTP_PORTS = {name: f"FLOCKWATCH_{name.upper()}_PORT" for name in ("gateway", "feedback", "trainer")}
HEAVY = {"torch", "snorkel", "transformers", "peft", "bitsandbytes", "sentence-transformers"}
ONLY_FOR = {"mapie": {"arbiter"}}  # conformal calibrators: in the arbiter's slim image, in no other
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
        for cls in (CommonSettings, *SETTINGS.values())
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


def test_kafka_requires_sasl_and_every_client_authenticates(services: dict[str, dict[str, Any]]) -> None:
    """Every listener a client can reach is SASL (PLAIN, one user whose password comes from .env); every
    Flockwatch service, the healthcheck and kafka-init authenticate with it."""
    kafka = services["kafka"]["environment"]
    protocols = dict(pair.split(":") for pair in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    listeners = [entry.split("://")[0] for entry in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")]
    password = "${FLOCKWATCH_KAFKA_PASSWORD:?"
    for name in listeners:
        assert protocols[name] == "SASL_PLAINTEXT", name
        jaas = kafka[f"KAFKA_LISTENER_NAME_{name}_PLAIN_SASL_JAAS_CONFIG"]
        assert f'user_flockwatch="{password}' in jaas and f'username="flockwatch" password="{password}' in jaas
    assert "CONTROLLER" not in listeners and kafka["KAFKA_SASL_ENABLED_MECHANISMS"] == "PLAIN"
    for name, service in _ours(services).items():
        env = service.get("environment", {})
        if env.get("FLOCKWATCH_BUS_URL", "").startswith("kafka://"):
            assert env["FLOCKWATCH_KAFKA_SASL_MECHANISM"] == "PLAIN", name
            assert env["FLOCKWATCH_KAFKA_USERNAME"] == "flockwatch", name
            assert env["FLOCKWATCH_KAFKA_PASSWORD"].startswith(password), name
    for script in (services["kafka"]["healthcheck"]["test"][-1], services["kafka-init"]["command"][0]):
        assert "--command-config /tmp/client.properties" in script and "sasl.mechanism=PLAIN" in script
        assert "$$CLIENT_PASSWORD" in script
    assert services["kafka-init"]["environment"]["CLIENT_PASSWORD"].startswith(password)
    assert kafka["CLIENT_PASSWORD"].startswith(password)


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
    assert services["regex_voter"]["build"]["dockerfile"] == "deploy/Dockerfile.slim"


def _slim(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Compose services built from deploy/Dockerfile.slim → the SERVICE build argument."""
    return {
        name: s["build"].get("args", {}).get("SERVICE", "")
        for name, s in services.items()
        if s.get("build", {}).get("dockerfile") == "deploy/Dockerfile.slim"
    }


def _requirements(path: Path) -> list[str]:
    """A requirements file's requirements, `-r` includes followed."""
    found: list[str] = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found += _requirements(path.parent / line[3:].strip())
        elif line:
            found.append(line)
    return found


def test_slim_images_are_built_per_service_from_their_own_requirements(services: dict[str, dict[str, Any]]) -> None:
    slim = _slim(services)
    assert {"regex_voter", "gateway", "classical_voter", "arbiter", "llm_voter"} <= set(slim)
    for name, arg in slim.items():
        assert arg == name, f"{name}: builds with SERVICE={arg!r}"
        assert (REQUIREMENTS / f"{name}.txt").is_file(), f"no deploy/requirements/{name}.txt"
        assert services[name]["image"] == f"flockwatch-{name}:latest"  # one image per service, none shared
    instructions = _instructions(DOCKERFILE_SLIM)
    assert ("ARG", "SERVICE") in instructions
    installs = _pip_installs(DOCKERFILE_SLIM)
    assert ["-r", "deploy/requirements/${SERVICE}.txt"] in installs
    assert ["--no-deps", "."] in installs, "the project must go in without its (torch-pulling) dependencies"


@pytest.mark.parametrize("requirements", sorted(REQUIREMENTS.glob("*.txt")), ids=lambda p: p.stem)
def test_slim_requirements_hold_no_torch(requirements: Path) -> None:
    names = {canonicalize_name(Requirement(r).name) for r in _requirements(requirements)}
    assert not names & HEAVY
    assert not _closure(_requirements(requirements)) & HEAVY, "a listed package pulls in torch & co."


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, DOCKERFILE_SLIM], ids=lambda p: p.name)
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


# Third-party modules a service imports only when it runs, on the path compose uses (checked against the code
# by test_lazy_imports_of_the_vllm_backend_are_probed).
LAZY = {"llm_voter": ["openai"]}  # services/llm_voter/backends.py: VLLMBackend
PROBE = """
import asyncio, importlib, json, sys, importlib.metadata as md
import flockwatch.cli.main, flockwatch.cli.runtime, flockwatch.common.bus_faststream
from flockwatch.cli.runtime import build
from flockwatch.common import tracing
from flockwatch.gateway.settings import GatewaySettings
name, bundle, lazy = sys.argv[1], sys.argv[2] or None, json.loads(sys.argv[3])
settings = GatewaySettings(
    bus_url="kafka://kafka:9092", state_url="redis://redis:6379/0", tracing="otlp", _env_file=None,
    **({"model_dir": bundle} if bundle else {}),
)
tracing.exporter_for(settings)  # the OTLP exporter is imported only when tracing is on, as in compose
bus, services = build([name], settings)
if name == "gateway":
    from flockwatch.gateway.app import create_app
    create_app(settings, bus, services)
async def run():  # load (and verify) the bundle as the service does when it starts
    for service in services:
        await service.start()
    for service in services:
        await service.stop()
if bundle:
    asyncio.run(run())
for module in lazy:
    importlib.import_module(module)
names = md.packages_distributions()
print(json.dumps(sorted({d for m in list(sys.modules) for d in names.get(m.split(".")[0], [])})))
"""


def imported_distributions(service: str, bundle: Path | None = None) -> set[str]:
    """The distributions a service's process imports when built (and, with a bundle, started on it)."""
    args = [sys.executable, "-c", PROBE, service, str(bundle or ""), json.dumps(LAZY.get(service, []))]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=180, cwd=ROOT)
    return {canonicalize_name(d) for d in json.loads(out.stdout.splitlines()[-1])}


def assert_slim_image_covers(service: str, imported: set[str]) -> None:
    """No torch & co. on the service's path, and its requirements file brings every project dependency it uses."""
    forbidden = HEAVY | {name for name, services in ONLY_FOR.items() if service not in services}
    assert not imported & forbidden, f"{service} imports {sorted(imported & forbidden)}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    direct = {canonicalize_name(Requirement(r).name) for r in declared} & imported
    missing = direct - _closure(_requirements(REQUIREMENTS / f"{service}.txt")) - OPTIONAL
    assert not missing, f"deploy/requirements/{service}.txt misses {sorted(missing)}"


def test_lazy_imports_of_the_vllm_backend_are_probed() -> None:
    tree = ast.parse((ROOT / "services" / "llm_voter" / "backends.py").read_text())
    (backend,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VLLMBackend"]
    imported = {
        alias.name.split(".")[0] for n in ast.walk(backend) if isinstance(n, ast.Import) for alias in n.names
    } | {n.module.split(".")[0] for n in ast.walk(backend) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported - {"flockwatch"} == set(LAZY["llm_voter"])


@pytest.mark.parametrize("service", ["regex_voter", "gateway", "llm_voter"])
def test_slim_image_covers_what_its_service_imports(service: str) -> None:
    # the model-loading services (classical voter, arbiter) are checked with a bundle loaded:
    # tests/integration/test_slim_images.py
    assert_slim_image_covers(service, imported_distributions(service))


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed (`docker compose config` needs no engine)")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def _option(argv: list[str], name: str) -> str:
    """The value of `--name=value` or `--name value` in a command line."""
    for i, word in enumerate(argv):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name:
            return argv[i + 1]
    raise KeyError(name)


def test_published_host_ports_are_unique_and_http_services_publish_their_listen_port(
    services: dict[str, dict[str, Any]],
) -> None:
    host_ports = [str(p).split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), host_ports
    for name, variable in HTTP_PORTS.items():
        port = _env(services[name])[variable]
        assert f"{port}:{port}" in services[name]["ports"], name


def test_named_volumes_are_declared_and_bind_mounts_exist(services: dict[str, dict[str, Any]]) -> None:
    declared = set(yaml.safe_load(COMPOSE.read_text()).get("volumes", {}))
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source!r} is not declared"


def _scrape_targets() -> dict[str, tuple[str, int]]:
    """Prometheus job → (compose service name, port) for the DNS-discovered jobs."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            (name,) = sd["names"]
            targets[job["job_name"]] = (name, int(sd["port"]))
    return targets


def test_prometheus_scrapes_every_service_on_the_port_it_serves_metrics_on(
    services: dict[str, dict[str, Any]],
) -> None:
    targets = _scrape_targets()
    expected = {}
    for name, service in _ours(services).items():
        env = _env(service)
        if name in HTTP_PORTS:  # /metrics on the API port
            expected[name] = (name, int(env[HTTP_PORTS[name]]))
            assert "FLOCKWATCH_METRICS_PORT" not in env, f"{name} serves /metrics on its API port"
        elif name in KNOWN:  # bus-only: the metrics port, listening beyond the container's loopback
            assert env.get("FLOCKWATCH_METRICS_HOST") == "0.0.0.0", name
            expected[name] = (name, int(env["FLOCKWATCH_METRICS_PORT"]))
    expected["vllm"] = ("vllm", int(_option(_words(services["vllm"]["command"]), "--port")))
    assert targets == expected
    assert set(expected) == set(KNOWN) | {"vllm"}  # every Flockwatch service is scraped


def test_grafana_provisions_the_prometheus_datasource_and_loads_the_checked_in_dashboard(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    mounts = dict(str(v).split(":")[:2] for v in grafana["volumes"] if str(v).startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "flockwatch.yml").read_text())["datasources"]
    by_uid = {d["uid"]: d for d in sources}
    prometheus = urlsplit(by_uid["prometheus"]["url"])
    assert prometheus.hostname == "prometheus"
    assert f"{prometheus.port}:{prometheus.port}" in services["prometheus"]["ports"]
    assert urlsplit(by_uid["jaeger"]["url"]).hostname == "jaeger"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "flockwatch.yml").read_text())["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    # panels follow the $datasource variable, whose default is the provisioned Prometheus
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert {p["datasource"]["uid"] for p in panels} == {"${datasource}"}
    assert variable["current"]["value"] in by_uid and by_uid[variable["current"]["value"]]["type"] == variable["query"]


def _metric_names() -> dict[str, tuple[str, ...]]:
    """Every exposed series name of the Flockwatch metrics → its label names."""
    exposed: dict[str, tuple[str, ...]] = {}
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    for module in (telemetry, feedback_telemetry):
        for metric in vars(module).values():
            if isinstance(metric, Counter | Gauge | Histogram):
                labels = tuple(metric._labelnames) + (("le",) if isinstance(metric, Histogram) else ())
                for suffix in suffixes[metric._type]:
                    exposed[metric._name + suffix] = labels
    return exposed


def _queries() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_name_metrics_and_labels_that_exist() -> None:
    exposed = _metric_names()
    for query in _queries():
        used = re.findall(r"\b(flockwatch_\w+)", query)
        assert used, query
        for name in used:
            assert name in exposed, f"{name} (in {query!r}) is not a Flockwatch metric"
        for name, selector in re.findall(r"(flockwatch_\w+)\{([^}]*)\}", query):
            keys = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
            assert keys <= set(exposed[name]), f"{name} has no label {sorted(keys - set(exposed[name]))}"
        known = {"job", "instance"} | {label for name in used for label in exposed[name]}
        for clause in re.findall(r"\bby \(([^)]*)\)", query):
            grouped = {label.strip() for label in clause.split(",")}
            assert grouped <= known, f"{query!r} groups by unknown labels {sorted(grouped - known)}"


def test_dashboard_shows_throughput_latency_abstentions_llm_calls_dead_letters_and_model_versions() -> None:
    queries = " ".join(_queries())
    for metric in (
        "flockwatch_messages_in_total",  # throughput
        "flockwatch_decision_latency_seconds_bucket",  # latency
        "flockwatch_http_request_seconds_bucket",
        'flockwatch_decisions_total{outcome="abstain"}',  # abstain rate
        'flockwatch_cascade_requests_total{voter="llm"}',  # LLM call rate
        "flockwatch_dead_letters_total",
        "flockwatch_model_info",
    ):
        assert metric in queries, metric


def test_vllm_serves_the_base_model_with_runtime_lora_for_the_llm_voter_under_the_gpu_profile(
    services: dict[str, dict[str, Any]],
) -> None:
    vllm, voter = services["vllm"], services["llm_voter"]
    assert str(vllm["image"]).startswith("vllm/vllm-openai:v")  # the official server image, pinned
    assert vllm["profiles"] == ["gpu"] and voter["profiles"] == ["gpu"]
    argv = _words(vllm["entrypoint"]) + _words(vllm["command"])
    assert argv[:2] == ["vllm", "serve"] and "--enable-lora" in argv
    lora = LoraConfig.model_validate(yaml.safe_load((ROOT / "configs" / "llm_lora.yaml").read_text()))
    assert int(_option(argv, "--max-lora-rank")) >= lora.r
    assert str(vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]).lower() in ("1", "true")
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    env = _env(voter)
    settings = LLMSettings(**{k.removeprefix("FLOCKWATCH_").lower(): v for k, v in env.items()}, _env_file=None)
    assert settings.llm_backend == "vllm"
    url = urlsplit(settings.llm_vllm_url)
    assert url.hostname == "vllm" and url.port == int(_option(argv, "--port"))
    # the adapter paths the voter names must exist in the server: the models volume at the adapter root
    assert f"models:{settings.llm_vllm_adapter_root}:ro" in vllm["volumes"]
    assert voter["depends_on"]["vllm"]["condition"] == "service_healthy"


def test_services_trace_to_the_compose_jaeger_and_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in _ours(services).items():
        settings = CommonSettings(
            **{
                k.removeprefix("FLOCKWATCH_").lower(): v
                for k, v in _env(service).items()
                if k.removeprefix("FLOCKWATCH_").lower() in CommonSettings.model_fields
            },
            _env_file=None,
        )
        if name in KNOWN:
            assert settings.tracing == "otlp" and urlsplit(settings.otlp_endpoint or "").hostname in services, name
    for name, service in services.items():
        image = str(service.get("image", ""))
        assert not image.startswith("flockwatch") or "build" in service, name
        if not image.startswith("flockwatch"):
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"


# Keys of the Compose Specification (https://github.com/compose-spec/compose-spec, schema/compose-spec.json):
# a misspelt key (`depend_on`, `healthchek`) would otherwise only fail where a Docker engine runs.
TOP_LEVEL_KEYS = {"name", "services", "volumes", "networks", "secrets", "configs", "include", "models", "version"}
SERVICE_KEYS = {
    "annotations", "attach", "build", "cap_add", "cap_drop", "cgroup", "command", "configs", "container_name",
    "cpus", "depends_on", "deploy", "develop", "devices", "dns", "entrypoint", "env_file", "environment", "expose",
    "extra_hosts", "gpus", "healthcheck", "hostname", "image", "init", "ipc", "labels", "logging", "mem_limit",
    "models", "network_mode", "networks", "pid", "platform", "post_start", "pre_stop", "privileged", "profiles",
    "pull_policy", "read_only", "restart", "runtime", "scale", "secrets", "security_opt", "shm_size", "stdin_open",
    "stop_grace_period", "stop_signal", "sysctls", "tmpfs", "tty", "ulimits", "user", "volumes", "working_dir",
    "ports", "links", "external_links", "extends", "volumes_from", "group_add", "domainname", "dns_opt",
    "dns_search", "cpu_shares", "cpu_quota", "cpu_period", "cpu_rt_period", "cpu_rt_runtime", "cpu_count",
    "cpu_percent", "cpuset", "cgroup_parent", "blkio_config", "credential_spec", "device_cgroup_rules",
    "label_file", "mac_address", "mem_reservation", "mem_swappiness", "memswap_limit", "oom_kill_disable",
    "oom_score_adj", "pids_limit", "storage_opt", "userns_mode", "uts", "isolation", "provider", "use_api_socket",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def test_compose_uses_only_keys_of_the_compose_specification(services: dict[str, dict[str, Any]]) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    assert {k for k in compose if not k.startswith("x-")} <= TOP_LEVEL_KEYS
    for name, service in services.items():
        assert set(service) <= SERVICE_KEYS, f"{name}: {sorted(set(service) - SERVICE_KEYS)}"
        assert set(service.get("healthcheck", {})) <= HEALTHCHECK_KEYS, name
        depends = service.get("depends_on", {})
        if isinstance(depends, dict):
            assert {d["condition"] for d in depends.values()} <= CONDITIONS, name
            waited = [d for d, c in depends.items() if c["condition"] == "service_healthy"]
            assert all("healthcheck" in services[d] for d in waited), f"{name} waits for a service without healthcheck"


def test_dashboard_variables_are_defined_used_and_drive_the_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "group", "voter"} <= defined
    queries = " ".join(_queries())
    used = set(re.findall(r"\$(\w+)", queries)) - {"__rate_interval", "__interval", "__range"}
    assert used == defined - {"datasource"}, (used, defined)  # every filter variable filters some panel
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert re.fullmatch(r"label_values\((flockwatch_\w+), (\w+)\)", var["query"]["query"])
            assert var["includeAll"] and var["allValue"] == ".*"  # "All" matches series without the label too
    sources = [p.get("datasource") for p in dashboard["panels"] if p.get("targets")]
    sources += [t.get("datasource") for p in dashboard["panels"] for t in p.get("targets", [])]
    assert all(s is None or s["uid"] == "${datasource}" for s in sources), "a panel is pinned to one datasource"
