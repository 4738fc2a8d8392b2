"""docker-compose.yml stays in step with meterflow.yaml, the config model and the local stack (no Docker needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from meterflow.config import CONFIG_PATH_ENV, SECRET_ENV_KEYS, JobConfig, load_config
from tests.conftest import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
PASSWORD_REF = re.compile(r"^\$\{METERFLOW_POSTGRES_PASSWORD(:?[?-][^}]*)?\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as YAML (anchors and merge keys resolved)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def cfg() -> JobConfig:
    """The default config, read without the real environment."""
    return load_config(REPO_ROOT / "meterflow.yaml", environ={})


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _all_environments(compose: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {name: _environment(svc) for name, svc in compose["services"].items()}


def _published(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port of a service's short-syntax port mappings."""
    mapping = {}
    for entry in service.get("ports", []):
        *_, host, container = str(entry).split(":")
        mapping[int(container.split("/")[0])] = int(host)
    return mapping


def _command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def _bind_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
        if source.startswith(("./", "../", "/")):
            sources.append(source)
    return sources


def _names_config_field(key: str) -> bool:
    model: type[BaseModel] = JobConfig
    parts = key.removeprefix("METERFLOW_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i == len(parts) - 1:
            return not is_section
        if not is_section:
            return False
        model = annotation
    return False


def test_topics_match_config(compose, cfg):
    """kafka-init creates exactly the configured topics with the configured partition count."""
    script = _command_text(compose["services"]["kafka-init"])
    assert "--if-not-exists" in script
    topics = re.findall(r"--topic\s+(\S+)", script)
    partitions = {int(p) for p in re.findall(r"--partitions\s+(\d+)", script)}
    k = cfg.kafka
    assert sorted(topics) == sorted([k.usage_events_topic, k.late_events_topic, k.dead_letter_topic, k.closed_windows_topic])
    assert partitions == {k.partitions}
    assert int(_environment(compose["services"]["kafka"])["KAFKA_NUM_PARTITIONS"]) == k.partitions


def test_kafka_single_node_transactions(compose):
    """The broker keeps one replica of its internal topics, as transactions on one node need."""
    env = _environment(compose["services"]["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[key] == "1", key


def test_kafka_host_port_matches_bootstrap(compose, cfg):
    """The host reaches the broker on the port of meterflow.yaml's bootstrap_servers, advertised back to it."""
    host_port = int(cfg.kafka.bootstrap_servers.split(",")[0].rpartition(":")[2])
    env = _environment(compose["services"]["kafka"])
    assert host_port in _published(compose["services"]["kafka"]).values()
    assert re.search(rf"://(localhost|127\.0\.0\.1):{host_port}\b", env["KAFKA_ADVERTISED_LISTENERS"])
    assert re.search(r"://kafka:9092\b", env["KAFKA_ADVERTISED_LISTENERS"])


def test_postgres_host_port(compose, cfg):
    """Postgres is published on the host at postgres.port."""
    assert _published(compose["services"]["postgres"]) == {5432: cfg.postgres.port}


def test_jobmanager_rest_port(compose, cfg):
    """The JobManager REST API is published at flink.rest_port and matches flink-conf's rest.port."""
    flink_conf = yaml.safe_load((REPO_ROOT / "flink-conf" / "config.yaml").read_text())
    assert _published(compose["services"]["jobmanager"]) == {flink_conf["rest"]["port"]: cfg.flink.rest_port}


def test_postgres_database_and_user(compose, cfg):
    """The Postgres container creates postgres.database owned by postgres.user."""
    env = _environment(compose["services"]["postgres"])
    assert env["POSTGRES_DB"] == cfg.postgres.database
    assert env["POSTGRES_USER"] == cfg.postgres.user


def test_meterflow_env_keys_name_config_fields(compose):
    """Every METERFLOW_* override in the compose file names a real config field."""
    keys = {key for env in _all_environments(compose).values() for key in env if key.startswith("METERFLOW_")}
    keys |= set(re.findall(r"\bMETERFLOW_[A-Z0-9_]+", COMPOSE_FILE.read_text()))
    overrides = keys - set(SECRET_ENV_KEYS) - {CONFIG_PATH_ENV}
    assert overrides, "expected METERFLOW_<SECTION>__<KEY> overrides for the compose hosts"
    assert sorted(key for key in overrides if not _names_config_field(key)) == []


def test_meterflow_env_loads_compose_hosts(compose):
    """The submit service's overrides load into a valid config pointing at the compose hosts."""
    env = {k: v for k, v in _environment(compose["services"]["submit"]).items() if k.startswith("METERFLOW_") and k not in SECRET_ENV_KEYS}
    cfg = load_config(REPO_ROOT / "meterflow.yaml", environ=env)
    assert cfg.kafka.bootstrap_servers == "kafka:9092"
    assert (cfg.postgres.host, cfg.postgres.port) == ("postgres", 5432)
    assert cfg.postgres.port in _published(compose["services"]["postgres"])
    assert cfg.flink.rest_host == "jobmanager"
    assert cfg.checkpoint_uri() == "file:///opt/flink/checkpoints"


def test_no_literal_password(compose):
    """Passwords come only from ${METERFLOW_POSTGRES_PASSWORD...}, never a value in the file."""
    postgres = _environment(compose["services"]["postgres"])
    assert PASSWORD_REF.match(postgres["POSTGRES_PASSWORD"])
    submit = _environment(compose["services"]["submit"])
    assert PASSWORD_REF.match(submit["METERFLOW_POSTGRES_PASSWORD"])
    for service, env in _all_environments(compose).items():
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|API_KEY|TOKEN", key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:?[?-][^}]*)?\}", value), f"{service}: {key} is not taken from the environment"
    for line in COMPOSE_FILE.read_text().splitlines():
        match = re.match(r"\s*-?\s*([\w.-]*PASSWORD[\w.-]*)\s*[:=]\s*(\S.*)$", line, re.IGNORECASE)
        if match and not line.lstrip().startswith("#"):
            assert match.group(2).startswith("${"), f"literal value for {match.group(1)}"


def test_flink_conf_mount_exists(compose):
    """flink-conf/config.yaml is mounted into every Flink container and every bind-mount source exists."""
    for name in ("jobmanager", "taskmanager", "submit"):
        sources = _bind_sources(compose["services"][name])
        assert "./flink-conf/config.yaml" in sources, name
        for source in sources:
            assert (REPO_ROOT / source).resolve().exists(), f"{name}: {source} does not exist"


def test_dockerfile_fetches_connector_jars():
    """The Flink image's connector-jar step resolves stack/flink-lib/pom.xml into /opt/flink/lib."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    build = compose["services"]["jobmanager"]["build"]
    dockerfile = (REPO_ROOT / build["context"] / build["dockerfile"]).resolve()
    text = dockerfile.read_text()
    assert "stack/flink-lib/pom.xml" in text
    assert re.search(r"dependency:copy-dependencies\b.*-DexcludeTransitive=true", text)
    assert re.search(r"COPY --from=\S+ \S+/target/dependency/\*\.jar /opt/flink/lib/", text)


def test_dockerfile_copies_existing_sources():
    """Every repository path the Dockerfile COPYs exists."""
    text = (REPO_ROOT / "docker" / "flink" / "Dockerfile").read_text()
    for line in re.findall(r"(?m)^COPY (?!--from)(.+)$", text):
        *sources, _dest = line.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), source


def test_flink_services_share_checkpoint_volumes(compose):
    """jobmanager and taskmanager share the checkpoint and savepoint volumes that flink-conf names."""
    flink_conf = yaml.safe_load((REPO_ROOT / "flink-conf" / "config.yaml").read_text())
    checkpointing = flink_conf["execution"]["checkpointing"]
    targets = {Path(checkpointing["dir"].removeprefix("file://")), Path(checkpointing["savepoint-dir"].removeprefix("file://"))}
    for name in ("jobmanager", "taskmanager"):
        named = {v.split(":")[0]: Path(v.split(":")[1]) for v in compose["services"][name]["volumes"] if not v.startswith(("./", "../", "/"))}
        assert targets <= set(named.values()), name
        assert set(named) <= set(compose["volumes"]), name


def test_flink_conf_prometheus_reporter_jar_is_in_the_image():
    """flink-conf's Prometheus reporter comes from a jar of stack/flink-lib/pom.xml, which the image puts in /opt/flink/lib."""
    flink_conf = yaml.safe_load((REPO_ROOT / "flink-conf" / "config.yaml").read_text())
    prom = flink_conf["metrics"]["reporter"]["prom"]
    assert prom["factory"]["class"] == "org.apache.flink.metrics.prometheus.PrometheusReporterFactory"
    assert int(prom["port"]) > 0
    pom = (REPO_ROOT / "stack" / "flink-lib" / "pom.xml").read_text()
    assert re.search(r"<artifactId>flink-metrics-prometheus</artifactId>\s*<version>2\.3\.\d+</version>", pom)
