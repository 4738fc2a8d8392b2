"""docker-compose.yml stays in step with meterflow.yaml, the config model and the local stack (no Docker needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from meterflow.config import (
    CONFIG_PATH_ENV,
    SECRET_ENV_KEYS,
    SECRET_FILE_SUFFIX,
    JobConfig,
    load_config,
)
from meterflow.security import is_loopback
from tests.conftest import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "docker" / "flink" / "Dockerfile"
SECRET_FILE_KEYS = {key + SECRET_FILE_SUFFIX for key in SECRET_ENV_KEYS}


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
    assert sorted(topics) == sorted(
        [k.usage_events_topic, k.late_events_topic, k.dead_letter_topic, k.closed_windows_topic]
    )
    assert partitions == {k.partitions}
    assert int(_environment(compose["services"]["kafka"])["KAFKA_NUM_PARTITIONS"]) == k.partitions


def test_topic_configs_match_the_project(compose, cfg):
    """kafka-init creates each topic with connectors/topics.py's configs and sets them on an existing one."""
    from connectors.topics import topic_configs

    script = _command_text(compose["services"]["kafka-init"])
    created = {
        m.group(1): dict(re.findall(r"--config\s+([\w.]+)=(\S+)", m.group(2)))
        for m in re.finditer(r"kafka-topics\.sh .*?--create .*?--topic\s+(\S+)([^\n]*)", script)
    }
    altered = {
        m.group(1): dict(pair.split("=", 1) for pair in m.group(2).split(","))
        for m in re.finditer(
            r"kafka-configs\.sh .*?--alter --entity-type topics --entity-name\s+(\S+) --add-config\s+(\S+)", script
        )
    }
    goal = topic_configs(cfg)
    assert created == goal
    assert altered == {topic: configs for topic, configs in goal.items() if configs}


def test_submit_is_meterflow_submit_with_the_retained_states_in_reach(compose):
    """The compose submit is `meterflow submit` (its checks, and a job started from its newest retained
    state, never from empty state while one exists), not a bare `flink run`; the checkpoint volume is
    mounted where METERFLOW_FLINK__CHECKPOINT_DIR points, so it can list the states."""
    submit = compose["services"]["submit"]
    script = _command_text(submit)
    assert re.search(r"\bmeterflow --config /opt/meterflow/meterflow\.yaml submit\b", script)
    assert "flink run" not in script
    checkpoint_dir = _environment(submit)["METERFLOW_FLINK__CHECKPOINT_DIR"].removeprefix("file://")
    mounted = {v.split(":")[1] for v in submit["volumes"] if not v.startswith(("./", "../", "/"))}
    assert checkpoint_dir in mounted


def test_corrections_follower_runs_with_the_stack_and_is_restarted(compose):
    """Late events become corrections without anyone running a command: a follower that compose restarts."""
    svc = compose["services"]["corrections"]
    assert svc["entrypoint"] + svc["command"] == [
        "meterflow",
        "--config",
        "/opt/meterflow/meterflow.yaml",
        "corrections",
        "apply",
        "--follow",
    ]
    assert svc["restart"] == "unless-stopped"
    assert svc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_http_service_runs_with_the_stack_on_the_hosts_loopback(compose, cfg):
    """`meterflow serve` as a service compose restarts, listening inside the network, published on 127.0.0.1 only."""
    svc = compose["services"]["serve"]
    assert svc["entrypoint"] + svc["command"] == ["meterflow", "--config", "/opt/meterflow/meterflow.yaml", "serve"]
    assert svc["restart"] == "unless-stopped"
    assert svc["ports"] == [f"127.0.0.1:{cfg.serve.port}:{cfg.serve.port}"]
    assert _environment(svc)["METERFLOW_SERVE__HOST"] == "0.0.0.0"
    assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["secrets"] == ["postgres_password"], "the service bills nothing: no Stripe key"
    assert _environment(svc)["METERFLOW_POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"


def test_kafka_single_node_transactions(compose):
    """The broker keeps one replica of its internal topics, as transactions on one node need."""
    env = _environment(compose["services"]["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
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
    overrides = keys - set(SECRET_ENV_KEYS) - SECRET_FILE_KEYS - {CONFIG_PATH_ENV}
    assert overrides, "expected METERFLOW_<SECTION>__<KEY> overrides for the compose hosts"
    assert sorted(key for key in overrides if not _names_config_field(key)) == []


def test_meterflow_env_loads_compose_hosts(compose):
    """The submit service's overrides load into a valid config pointing at the compose hosts."""
    env = {
        k: v
        for k, v in _environment(compose["services"]["submit"]).items()
        if k.startswith("METERFLOW_") and k not in SECRET_ENV_KEYS and k not in SECRET_FILE_KEYS
    }
    cfg = load_config(REPO_ROOT / "meterflow.yaml", environ=env)
    assert cfg.kafka.bootstrap_servers == "kafka:9092"
    assert (cfg.postgres.host, cfg.postgres.port) == ("postgres", 5432)
    assert cfg.postgres.port in _published(compose["services"]["postgres"])
    assert cfg.flink.rest_host == "jobmanager"
    assert cfg.checkpoint_uri() == "file:///opt/flink/checkpoints"


def test_no_secret_in_the_file_or_an_environment(compose):
    """Secrets come only from Compose secrets fed by the caller's environment: no value, nor reference, in any environment."""
    for service, env in _all_environments(compose).items():
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|API_KEY|TOKEN", key):
                assert key.endswith(SECRET_FILE_SUFFIX), f"{service}: {key} carries a secret value; use a secret file"
                assert value.startswith("/run/secrets/"), f"{service}: {key}={value}"
    for line in COMPOSE_FILE.read_text().splitlines():
        match = re.match(r"\s*-?\s*([\w.-]*(?:PASSWORD|API_KEY)[\w.-]*)\s*[:=]\s*(\S.*)$", line, re.IGNORECASE)
        if match and not line.lstrip().startswith("#"):
            assert match.group(2).startswith("/run/secrets/") or match.group(1) == "environment", (
                f"literal value for {match.group(1)}: {line}"
            )


def test_secrets_come_from_the_callers_environment(compose):
    """Each Compose secret is read from one of meterflow's secret variables, and every secret variable has one."""
    sources = {name: spec.get("environment") for name, spec in compose["secrets"].items()}
    assert all(sources.values()), sources
    assert set(sources.values()) == set(SECRET_ENV_KEYS)


@pytest.mark.parametrize("service", ["taskmanager", "submit", "corrections"])
def test_secret_files_are_mounted_where_the_processes_read_them(compose, service):
    """The TaskManager (which runs the sinks) and submit read every secret from a file of a secret they mount."""
    svc = compose["services"][service]
    env = _environment(svc)
    mounted = set(svc.get("secrets", []))
    for variable in SECRET_ENV_KEYS:
        path = env.get(variable + SECRET_FILE_SUFFIX)
        assert path, f"{service} lacks {variable}{SECRET_FILE_SUFFIX}"
        name = path.removeprefix("/run/secrets/")
        assert name in mounted and name in compose["secrets"], f"{service}: {path} is not a mounted secret"
        assert compose["secrets"][name]["environment"] == variable


def test_postgres_password_from_the_secret(compose):
    """The Postgres container sets its password from the same secret the TaskManager reads."""
    postgres = compose["services"]["postgres"]
    env = _environment(postgres)
    assert "POSTGRES_PASSWORD" not in env
    name = env["POSTGRES_PASSWORD_FILE"].removeprefix("/run/secrets/")
    assert name in postgres["secrets"]
    assert compose["secrets"][name]["environment"] == "METERFLOW_POSTGRES_PASSWORD"


def test_jobmanager_gets_no_secret(compose):
    """The job graph carries no secret, so the JobManager needs none."""
    svc = compose["services"]["jobmanager"]
    assert not svc.get("secrets")
    assert not any(key in SECRET_ENV_KEYS or key in SECRET_FILE_KEYS for key in _environment(svc))


def test_every_published_port_is_on_the_host_loopback(compose):
    """Every port mapping names a loopback host address: nothing is reachable from another machine."""
    published = [(name, str(entry)) for name, svc in compose["services"].items() for entry in svc.get("ports", [])]
    assert published
    for name, entry in published:
        parts = entry.rsplit(":", 2)
        assert len(parts) == 3 and is_loopback(parts[0]), f"{name}: {entry} is published on every interface"


def test_kafka_controller_on_loopback_and_advertised_host_on_loopback(compose):
    """The broker's controller listener is loopback-only; the host-side listener is advertised as 127.0.0.1."""
    env = _environment(compose["services"]["kafka"])
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    assert is_loopback(listeners["CONTROLLER"].rpartition(":")[0])
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert is_loopback(advertised["EXTERNAL"].rpartition(":")[0])


def test_flink_services_listen_inside_the_network(compose):
    """flink-conf binds loopback; the Flink containers override every bind address for the private network."""
    flink_conf = yaml.safe_load((REPO_ROOT / "flink-conf" / "config.yaml").read_text())
    for name in ("jobmanager", "taskmanager"):
        props = dict(
            line.split(": ", 1)
            for line in _environment(compose["services"][name])["FLINK_PROPERTIES"].splitlines()
            if line.strip()
        )
        for section, key in (("jobmanager", "bind-host"), ("taskmanager", "bind-host"), ("rest", "bind-address")):
            assert is_loopback(flink_conf[section][key])
            assert props[f"{section}.{key}"] == "0.0.0.0", name
        assert props["rest.address"] == "jobmanager"


def test_flink_conf_mount_exists(compose):
    """flink-conf/config.yaml is mounted into every Flink container and every bind-mount source exists."""
    for name in ("jobmanager", "taskmanager", "submit"):
        sources = _bind_sources(compose["services"][name])
        assert "./flink-conf/config.yaml" in sources, name
        for source in sources:
            assert (REPO_ROOT / source).resolve().exists(), f"{name}: {source} does not exist"


def test_dockerfile_fetches_connector_jars():
    """The Flink image's connector-jar step resolves third_party/flink-lib/pom.xml into /opt/flink/lib."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    build = compose["services"]["jobmanager"]["build"]
    dockerfile = (REPO_ROOT / build["context"] / build["dockerfile"]).resolve()
    text = dockerfile.read_text()
    assert "third_party/flink-lib/pom.xml" in text
    assert re.search(r"dependency:copy-dependencies\b.*-DexcludeTransitive=true", text)
    assert re.search(r"COPY --from=\S+ \S+/target/dependency/\*\.jar /opt/flink/lib/", text)


def test_dockerfile_copies_existing_sources():
    """Every repository path the Dockerfile COPYs exists."""
    text = (REPO_ROOT / "docker" / "flink" / "Dockerfile").read_text()
    for line in re.findall(r"(?m)^COPY (?!--from)(.+)$", text):
        *sources, _dest = line.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), source


def test_dockerfile_copies_every_package_the_project_installs():
    """The image installs the project from what was copied: a package left out fails at import."""
    import tomllib

    text = (REPO_ROOT / "docker" / "flink" / "Dockerfile").read_text()
    packages = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = {line.split()[0].rstrip("/") for line in re.findall(r"(?m)^COPY (?!--from)(.+)$", text)}
    assert {p.split(".")[0] for p in packages} <= copied


def test_flink_services_share_checkpoint_volumes(compose):
    """jobmanager and taskmanager share the checkpoint and savepoint volumes that flink-conf names."""
    flink_conf = yaml.safe_load((REPO_ROOT / "flink-conf" / "config.yaml").read_text())
    checkpointing = flink_conf["execution"]["checkpointing"]
    targets = {
        Path(checkpointing["dir"].removeprefix("file://")),
        Path(checkpointing["savepoint-dir"].removeprefix("file://")),
    }
    for name in ("jobmanager", "taskmanager"):
        named = {
            v.split(":")[0]: Path(v.split(":")[1])
            for v in compose["services"][name]["volumes"]
            if not v.startswith(("./", "../", "/"))
        }
        assert targets <= set(named.values()), name
        assert set(named) <= set(compose["volumes"]), name


def _flink_properties(service: dict[str, Any]) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in _environment(service)["FLINK_PROPERTIES"].splitlines() if line.strip())


def test_flink_services_use_zookeeper_high_availability(compose):
    """JobManager and TaskManager run with ZooKeeper HA on the zookeeper service, with the same keys as the local stack;
    the HA files are on a named volume of the JobManager, and a JobManager that dies is restarted."""
    from meterflow.local.flink import FlinkCluster

    local_keys = set(FlinkCluster(JobConfig()).ha_config())
    zookeeper = compose["services"]["zookeeper"]
    assert zookeeper.get("ports") is None, "ZooKeeper is for the Flink containers only"
    assert _environment(zookeeper)["ZOO_ADMINSERVER_ENABLED"] == "false"
    jobmanager = compose["services"]["jobmanager"]
    for name in ("jobmanager", "taskmanager"):
        props = _flink_properties(compose["services"][name])
        ha = {k: v for k, v in props.items() if k.startswith("high-availability.")}
        assert set(ha) == local_keys, name
        assert ha["high-availability.type"] == "zookeeper"
        assert ha["high-availability.zookeeper.quorum"] == "zookeeper:2181"
        assert ha["high-availability.jobmanager.port"] == "6123"
    storage = Path(_flink_properties(jobmanager)["high-availability.storageDir"].removeprefix("file://"))
    named = {
        Path(v.split(":")[1]): v.split(":")[0] for v in jobmanager["volumes"] if not v.startswith(("./", "../", "/"))
    }
    assert storage in named and named[storage] in compose["volumes"]
    assert jobmanager["depends_on"]["zookeeper"]["condition"] == "service_healthy"
    assert jobmanager["restart"] == "unless-stopped"


def test_flink_conf_prometheus_reporter_jar_is_in_the_image():
    """flink-conf's Prometheus reporter comes from a jar of third_party/flink-lib/pom.xml, which the image puts in /opt/flink/lib."""
    flink_conf = yaml.safe_load((REPO_ROOT / "flink-conf" / "config.yaml").read_text())
    prom = flink_conf["metrics"]["reporter"]["prom"]
    assert prom["factory"]["class"] == "org.apache.flink.metrics.prometheus.PrometheusReporterFactory"
    assert int(prom["port"]) > 0
    pom = (REPO_ROOT / "third_party" / "flink-lib" / "pom.xml").read_text()
    assert re.search(r"<artifactId>flink-metrics-prometheus</artifactId>\s*<version>2\.3\.\d+</version>", pom)


def _dockerfile_stages() -> dict[str, list[str]]:
    """Instructions of each build stage, by stage name (the last, unnamed one is "final")."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines():
        if match := re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE):
            current = stages.setdefault(match.group(1) or "final", [])
        if line.strip() and not line.lstrip().startswith("#"):
            current.append(line.strip())
    return stages


def _linked_jar_dirs() -> list[Path]:
    """The directories whose jars `meterflow stack up` links into its cluster's lib/, read from FlinkCluster.prepare."""
    import inspect

    from meterflow.local import flink

    names = re.findall(r"require_jars\((\w+),", inspect.getsource(flink.FlinkCluster.prepare))
    assert len(names) >= 2, names
    return [getattr(flink, name).relative_to(REPO_ROOT) for name in names]


def _module_and_jar_glob(jar_dir: Path) -> tuple[Path, str]:
    """The Maven module that fills a jar directory, and the jars of it the stack links (``target/...``)."""
    parts = jar_dir.parts
    module = Path(*parts[: parts.index("target")])
    inside = Path(*parts[parts.index("target") :])
    pom = (REPO_ROOT / module / "pom.xml").read_text()
    final_name = re.search(r"<build>.*?<finalName>([^<]+)</finalName>", pom, re.DOTALL)
    # A module with a finalName is built (mvn package); its jar is the one artifact the stack links.
    return module, str(inside / (f"{final_name.group(1)}.jar" if final_name else "*.jar"))


@pytest.mark.parametrize("jar_dir", _linked_jar_dirs(), ids=str)
def test_image_has_every_jar_the_local_stack_links(jar_dir):
    """For each jar directory of the local stack's lib/, a build stage builds its Maven module and the image copies the same jars into /opt/flink/lib."""
    module, jar_glob = _module_and_jar_glob(jar_dir)
    stages = _dockerfile_stages()
    builders = [
        name
        for name, lines in stages.items()
        if any(re.match(rf"COPY {re.escape(str(module))}/pom\.xml\b", line) for line in lines)
        and any("mvn " in line for line in lines)
    ]
    assert builders, f"no stage builds {module}/pom.xml"
    copies = [
        line
        for line in stages["final"]
        if re.match(rf"COPY --from=({'|'.join(builders)}) \S*{re.escape(jar_glob)} /opt/flink/lib/$", line)
    ]
    assert copies, f"the image does not copy {module}'s {jar_glob} into /opt/flink/lib"


def test_image_resolves_connector_jars_like_setup():
    """The connector stage runs the same Maven resolution as scripts/setup.sh (fat "sql-" jars, no transitive jars)."""
    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r'\[ "\$module" = flink-lib \] && extra=\(-DexcludeTransitive=true\)', setup)
    stage = next(
        lines
        for lines in _dockerfile_stages().values()
        if any("third_party/flink-lib/pom.xml" in line for line in lines)
    )
    assert any(re.search(r"mvn .*dependency:copy-dependencies\b.*-DexcludeTransitive=true", line) for line in stage)


def test_jvm_stage_has_the_sources_the_jar_packages():
    """The JVM stage copies jvm/'s pom and sources and avro/, which the jar packages as resources."""
    pom = (REPO_ROOT / "jvm" / "pom.xml").read_text()
    assert "<directory>${project.basedir}/../avro</directory>" in pom
    stage = next(
        lines for lines in _dockerfile_stages().values() if any(line.startswith("COPY jvm/pom.xml") for line in lines)
    )
    copied = {line.split()[1].rstrip("/") for line in stage if line.startswith("COPY ")}
    assert {"avro", "jvm/pom.xml", "jvm/src"} <= copied


def test_image_flink_version_matches_the_jars_and_pyflink():
    """The image's Flink, the Flink jars of both poms and the apache-flink wheel are one version."""
    base = re.search(r"^FROM flink:(\d+\.\d+\.\d+)", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    udf_pom = (REPO_ROOT / "jvm" / "pom.xml").read_text()
    assert re.search(r"<flink.version>([^<]+)</flink.version>", udf_pom).group(1) == base
    lib_pom = (REPO_ROOT / "third_party" / "flink-lib" / "pom.xml").read_text()
    for artifact in ("flink-sql-avro", "flink-metrics-prometheus"):
        assert re.search(rf"<artifactId>{artifact}</artifactId>\s*<version>{re.escape(base)}</version>", lib_pom), (
            artifact
        )
    assert f'"apache-flink=={base}"' in (REPO_ROOT / "pyproject.toml").read_text()
    assert f"apache-flink=={base}" in DOCKERFILE.read_text()
