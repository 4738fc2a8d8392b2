"""ops/k8s/: the operators' resources valid against the committed CRD schemas (kubeconform -strict, offline), the
core resources decoded strictly by the Kubernetes API's Go types (scripts/k8s-core-check), all in step with
meterflow.yaml."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from meterflow.config import SECRET_ENV_KEYS, SECRET_FILE_SUFFIX, JobConfig, load_config
from tests.conftest import REPO_ROOT

K8S = REPO_ROOT / "ops" / "k8s"
SCHEMAS = K8S / "schemas"
SCHEMA_LOCATION = str(SCHEMAS) + "/{{ .ResourceKind }}-{{ .Group }}-{{ .ResourceAPIVersion }}.json"
MANIFESTS = sorted(K8S.glob("*.yaml"))
# The core kinds the manifests use: checked by k8s-core-check, skipped by kubeconform (no core schema is committed).
CORE_KINDS = ("Deployment", "Service", "PodDisruptionBudget")


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(REPO_ROOT / "third_party" / "bin")) or shutil.which(name)
    if not path:
        pytest.fail(f"{name} not found: run scripts/setup.sh (installs it into third_party/bin)")
    return path


def _validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    """kubeconform -strict against the committed schemas only (no network: no other schema location)."""
    args = [
        _tool("kubeconform"),
        "-strict",
        "-summary",
        "-output",
        "text",
        "-skip",
        ",".join(CORE_KINDS),
        "-schema-location",
        SCHEMA_LOCATION,
        *map(str, paths),
    ]
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)


def _check_core(*paths: Path) -> subprocess.CompletedProcess[str]:
    """The core resources decoded strictly into the Kubernetes API's Go types."""
    return subprocess.run(
        [_tool("k8s-core-check"), *map(str, paths)], capture_output=True, text=True, check=False, timeout=120
    )


@pytest.fixture(scope="module")
def resources() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def cfg() -> JobConfig:
    return load_config(REPO_ROOT / "meterflow.yaml", environ={})


def _of_kind(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r["kind"] == kind]


def _env(deployment: dict) -> dict[str, dict]:
    container = next(
        c for c in deployment["spec"]["podTemplate"]["spec"]["containers"] if c["name"] == "flink-main-container"
    )
    return {e["name"]: e for e in container["env"]}


def test_manifests_are_valid(resources):
    """Every operator resource validates strictly against the committed Flink operator and Strimzi schemas, and
    every core resource decodes strictly into its Kubernetes type: each resource is checked by exactly one."""
    assert MANIFESTS
    core = sum(r["kind"] in CORE_KINDS for r in resources)
    assert core == 3
    r = _validate(*MANIFESTS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Valid: {len(resources) - core}, Invalid: 0, Errors: 0, Skipped: {core}" in r.stdout, r.stdout
    r = _check_core(*MANIFESTS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Valid: {core}, Invalid: 0, Skipped: {len(resources) - core}" in r.stdout, r.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("  replicas: 2", "  replica: 2"), 'unknown field "spec.replica"'),
        (("          readinessProbe:", "          readinessProbes:"), "readinessProbes"),
        (("              containerPort: 8088", '              containerPort: "8088"'), "containerPort"),
        (("  type: ClusterIP", "  type: ClusterIP\n  type: NodePort"), "type"),
        (("kind: PodDisruptionBudget", "kind: PodDisruptionBudgets"), "PodDisruptionBudgets"),
        (("kind: PodDisruptionBudget", "kinds: PodDisruptionBudget"), "without a kind"),
        (("apiVersion: policy/v1", "apiVersion: policy/v1/x"), "without a kind or a valid apiVersion"),
    ],
)
def test_an_invalid_core_resource_fails(tmp_path, change, message):
    """A misspelt or unknown field, a value of the wrong type, a duplicated field or an unknown kind fails."""
    text = (K8S / "serve.yaml").read_text()
    assert change[0] in text
    broken = tmp_path / "serve.yaml"
    broken.write_text(text.replace(change[0], change[1], 1))
    r = _check_core(broken)
    assert r.returncode == 1
    assert "Invalid: 1" in r.stdout and message in r.stdout, r.stdout


@pytest.mark.parametrize(
    ("manifest", "change", "message"),
    [
        ("flink-usage.yaml", ("    upgradeMode: savepoint", "    upgradeMode: savepoints"), "upgradeMode"),
        ("flink-usage.yaml", ("    replicas: 2", "    replica: 2"), "additional properties 'replica'"),
        ("flink-billing.yaml", ("              mountPath:", "              mountPoint:"), "mountPoint"),
        ("kafka.yaml", ("        tls: false", "        tls: no-thanks"), "tls"),
        ("topics.yaml", ("  partitions: 3", "  partition: 3"), "partition"),
        ("kafka.yaml", ("kind: Kafka\n", "kind: KafkaCluster\n"), "could not find schema"),
    ],
)
def test_an_invalid_manifest_fails(tmp_path, manifest, change, message):
    """A misspelt field, a bad enum value or an unknown kind fails validation: the schemas are strict."""
    text = (K8S / manifest).read_text()
    assert change[0] in text
    broken = tmp_path / manifest
    broken.write_text(text.replace(change[0], change[1], 1))
    r = _validate(broken)
    assert r.returncode != 0
    assert message in r.stdout + r.stderr


def test_top_level_fields(resources):
    """Root fields are the four a resource has (the generated schemas leave the root open)."""
    for r in resources:
        assert set(r) <= {"apiVersion", "kind", "metadata", "spec"}, r["metadata"]["name"]
        assert r["metadata"]["name"] and "namespace" not in r["metadata"]


def test_topics_match_the_config(resources, cfg):
    """One KafkaTopic for each topic of meterflow.yaml, with its partitions, on the Kafka cluster of kafka.yaml."""
    k = cfg.kafka
    topics = _of_kind(resources, "KafkaTopic")
    assert sorted(t["metadata"]["name"] for t in topics) == sorted(
        [k.usage_events_topic, k.late_events_topic, k.dead_letter_topic, k.closed_windows_topic]
    )
    (kafka,) = _of_kind(resources, "Kafka")
    brokers = sum(p["spec"]["replicas"] for p in _of_kind(resources, "KafkaNodePool") if "broker" in p["spec"]["roles"])
    for t in topics:
        assert "topicName" not in t["spec"]
        assert t["spec"]["partitions"] == k.partitions, t["metadata"]["name"]
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
        assert int(t["spec"]["config"]["min.insync.replicas"]) < t["spec"]["replicas"] <= brokers


def test_topic_configs_match_the_project(resources, cfg):
    """Each KafkaTopic carries connectors/topics.py's configs: the LogAppendTime input, the sized dead letters."""
    from connectors.topics import MAX_MESSAGE_BYTES, TIMESTAMP_TYPE, topic_configs

    managed = (MAX_MESSAGE_BYTES, TIMESTAMP_TYPE)
    declared = {
        t["metadata"]["name"]: {k: str(v) for k, v in t["spec"].get("config", {}).items() if k in managed}
        for t in _of_kind(resources, "KafkaTopic")
    }
    assert declared == topic_configs(cfg)


def test_kafka_supports_the_jobs_transactions(resources, cfg):
    """Replicated transaction log, a transaction timeout the jobs' producers fit in, and only an internal listener."""
    (kafka,) = _of_kind(resources, "Kafka")
    conf = kafka["spec"]["kafka"]["config"]
    assert conf["transaction.state.log.replication.factor"] > conf["transaction.state.log.min.isr"] >= 2
    assert conf["transaction.max.timeout.ms"] >= cfg.kafka.transaction_timeout.total_seconds() * 1000
    assert [listener["type"] for listener in kafka["spec"]["kafka"]["listeners"]] == ["internal"]
    assert {p["metadata"]["labels"]["strimzi.io/cluster"] for p in _of_kind(resources, "KafkaNodePool")} == {
        kafka["metadata"]["name"]
    }


def test_job_names_and_scripts_match_the_config(resources, cfg):
    """The usage and billing FlinkDeployments carry the config's job names and run the matching job scripts."""
    by_name = {d["metadata"]["name"]: d for d in _of_kind(resources, "FlinkDeployment")}
    assert set(by_name) == {cfg.flink.job_name, cfg.billing_job_name}
    for name, script in ((cfg.flink.job_name, "jobs/usage_job.py"), (cfg.billing_job_name, "jobs/billing_job.py")):
        args = by_name[name]["spec"]["job"]["args"]
        assert args[args.index("-py") + 1] == f"/opt/meterflow/{script}"
        assert (REPO_ROOT / script).exists()


@pytest.mark.parametrize("which", ["usage", "billing"])
def test_deployment_config_loads_and_points_at_the_cluster(resources, cfg, which):
    """The pods' METERFLOW_* overrides load into a valid config: Kafka's bootstrap service, the job's parallelism, checkpoints on S3."""
    name = cfg.flink.job_name if which == "usage" else cfg.billing_job_name
    deployment = next(d for d in _of_kind(resources, "FlinkDeployment") if d["metadata"]["name"] == name)
    env = {k: e["value"] for k, e in _env(deployment).items() if k.startswith("METERFLOW_") and "value" in e}
    overrides = {
        k: v
        for k, v in env.items()
        if k not in SECRET_ENV_KEYS and not k.endswith(SECRET_FILE_SUFFIX) and k != "METERFLOW_CONFIG"
    }
    pod_cfg = load_config(REPO_ROOT / "meterflow.yaml", environ=overrides)
    (kafka,) = _of_kind(resources, "Kafka")
    port = next(listener["port"] for listener in kafka["spec"]["kafka"]["listeners"] if listener["type"] == "internal")
    assert pod_cfg.kafka.bootstrap_servers == f"{kafka['metadata']['name']}-kafka-bootstrap:{port}"
    assert env["METERFLOW_CONFIG"] == "/opt/meterflow/meterflow.yaml"
    parallelism = pod_cfg.flink.parallelism if which == "usage" else pod_cfg.billing_parallelism
    assert parallelism == deployment["spec"]["job"]["parallelism"]
    # Each job keeps its checkpoints under <checkpoint_dir>/<job name> (meterflow/retained_state.py).
    assert pod_cfg.job_state_uri(name) == f"s3://meterflow-flink/checkpoints/{name}"
    if which == "billing":
        assert pod_cfg.billing.enabled and pod_cfg.stripe.api_base == "https://api.stripe.com"


def test_deployments_run_ha_with_savepoint_upgrades(resources):
    """Application mode, Kubernetes HA, checkpoints/savepoints/HA data on S3, savepoint upgrades, the image's Flink version."""
    flink = re.search(
        r"^FROM flink:(\d+)\.(\d+)\.(\d+)", (REPO_ROOT / "docker" / "flink" / "Dockerfile").read_text(), re.MULTILINE
    ).groups()
    for d in _of_kind(resources, "FlinkDeployment"):
        spec, conf = d["spec"], d["spec"]["flinkConfiguration"]
        assert (
            spec["mode"] == "native" and spec["job"]["upgradeMode"] == "savepoint" and spec["job"]["state"] == "running"
        )
        assert spec["flinkVersion"] == f"v{flink[0]}_{flink[1]}"
        assert spec["job"]["jarURI"] == f"local:///opt/flink/opt/flink-python-{'.'.join(flink)}.jar"
        assert conf["high-availability.type"] == "kubernetes"
        for key in ("high-availability.storageDir", "execution.checkpointing.savepoint-dir"):
            assert conf[key].startswith("s3://") and conf[key].endswith(f"/{d['metadata']['name']}"), key
        assert conf["kubernetes.rest-service.exposed.type"] == "ClusterIP"
        venv = re.search(r"VIRTUAL_ENV=(\S+)", (REPO_ROOT / "docker" / "flink" / "Dockerfile").read_text()).group(1)
        args = spec["job"]["args"]
        assert (
            args[args.index("-pyclientexec") + 1]
            == conf["python.executable"]
            == conf["python.client.executable"]
            == f"{venv}/bin/python3"
        )
        assert _env(d)["ENABLE_BUILT_IN_PLUGINS"]["value"] == f"flink-s3-fs-hadoop-{'.'.join(flink)}.jar"


def _main_containers(resources: list[dict]) -> list[tuple[str, dict, dict]]:
    """(resource name, pod spec, main container) of each FlinkDeployment and Deployment."""
    pods = []
    for d in _of_kind(resources, "FlinkDeployment"):
        pod = d["spec"]["podTemplate"]["spec"]
        pods.append(
            (d["metadata"]["name"], pod, next(c for c in pod["containers"] if c["name"] == "flink-main-container"))
        )
    for d in _of_kind(resources, "Deployment"):
        pod = d["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        pods.append((d["metadata"]["name"], pod, container))
    return pods


def test_secrets_are_mounted_files_never_values(resources):
    """Each secret reaches a pod as a file of a mounted Kubernetes Secret (or a secretKeyRef), never as a literal."""
    pods = _main_containers(resources)
    assert len(pods) == 3
    for name, pod, container in pods:
        env = {e["name"]: e for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        files = {}
        # Projected volumes carry secrets; others (RocksDB's working directory) carry none.
        for volume in (v for v in pod["volumes"] if "projected" in v):
            for source in volume["projected"]["sources"]:
                for item in source["secret"]["items"]:
                    files[f"{mounts[volume['name']]}/{item['path']}"] = (source["secret"]["name"], item["key"])
        for key, entry in env.items():
            if re.search(r"PASSWORD|API_KEY|SECRET|TOKEN|ACCESS_KEY", key):
                if key.endswith(SECRET_FILE_SUFFIX):
                    assert entry["value"] in files, f"{name}: {key} names no mounted secret file"
                else:
                    assert "secretKeyRef" in entry.get("valueFrom", {}), f"{name}: {key} has a literal value"
        assert files[env["METERFLOW_POSTGRES_PASSWORD_FILE"]["value"]] == ("meterflow-postgres", "password")


def test_rocksdb_works_on_a_pod_volume_of_its_own(resources):
    """The usage job's default state backend keeps its working files on a sized volume, not the container's layer."""
    (usage,) = [d for d in _of_kind(resources, "FlinkDeployment") if d["metadata"]["name"] == "meterflow-usage"]
    local_dir = usage["spec"]["flinkConfiguration"]["state.backend.rocksdb.localdir"]
    pod = usage["spec"]["podTemplate"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "flink-main-container")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == local_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["sizeLimit"]


def test_postgres_is_external(resources):
    """No Postgres runs from these manifests, and no Secret is shipped: both are the operator's to provide."""
    kinds = {r["kind"] for r in resources}
    assert kinds == {"Kafka", "KafkaNodePool", "KafkaTopic", "FlinkDeployment", *CORE_KINDS}


def test_corrections_follower_runs_beside_the_usage_jobmanagers(resources, cfg):
    """Late events become corrections without anyone running a command: a follower container in each
    JobManager pod of the usage job, on the image's config pointed at the cluster, billing on, its
    metrics port declared, the Postgres password from the mounted secret."""
    usage = next(d for d in _of_kind(resources, "FlinkDeployment") if d["metadata"]["name"] == cfg.flink.job_name)
    [follower] = [
        c
        for c in usage["spec"]["jobManager"]["podTemplate"]["spec"]["containers"]
        if c["name"] == "corrections-follower"
    ]
    assert follower["command"] == [
        "meterflow",
        "--config",
        "/opt/meterflow/meterflow.yaml",
        "corrections",
        "apply",
        "--follow",
    ]
    assert follower["image"] == usage["spec"]["image"]
    env = {e["name"]: e["value"] for e in follower["env"]}
    pod_cfg = load_config(
        REPO_ROOT / "meterflow.yaml", environ={k: v for k, v in env.items() if not k.endswith(SECRET_FILE_SUFFIX)}
    )
    main = {k: e.get("value") for k, e in _env(usage).items()}
    assert (
        pod_cfg.kafka.bootstrap_servers == main["METERFLOW_KAFKA__BOOTSTRAP_SERVERS"]
        and pod_cfg.postgres.host == main["METERFLOW_POSTGRES__HOST"]
    )
    assert pod_cfg.billing.enabled
    assert [p["containerPort"] for p in follower["ports"]] == [pod_cfg.corrections.metrics_port]
    mounts = {m["name"]: m["mountPath"] for m in follower["volumeMounts"]}
    assert env["METERFLOW_POSTGRES_PASSWORD_FILE"].startswith(mounts["meterflow-secrets"] + "/")


def test_the_http_service_runs_the_image_on_the_cluster(resources, cfg):
    """`meterflow serve` from the jobs' image, its overrides a valid config pointed at Kafka's bootstrap service
    and the jobs' Postgres, listening on all of the pod's addresses at serve.port, without the Stripe key."""
    (deployment,) = _of_kind(resources, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["meterflow", "--config", "/opt/meterflow/meterflow.yaml", "serve"]
    usage = next(d for d in _of_kind(resources, "FlinkDeployment") if d["metadata"]["name"] == cfg.flink.job_name)
    assert container["image"] == usage["spec"]["image"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert not any("STRIPE" in key for key in env)
    pod_cfg = load_config(
        REPO_ROOT / "meterflow.yaml", environ={k: v for k, v in env.items() if not k.endswith(SECRET_FILE_SUFFIX)}
    )
    main = {k: e.get("value") for k, e in _env(usage).items()}
    assert pod_cfg.kafka.bootstrap_servers == main["METERFLOW_KAFKA__BOOTSTRAP_SERVERS"]
    assert (pod_cfg.postgres.host, str(pod_cfg.postgres.port)) == (
        main["METERFLOW_POSTGRES__HOST"],
        main["METERFLOW_POSTGRES__PORT"],
    )
    assert pod_cfg.serve.host == "0.0.0.0" and cfg.serve.host == "127.0.0.1"
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("http", pod_cfg.serve.port)]


def test_the_http_service_is_reached_through_its_service_and_probed_on_health(resources, cfg):
    """The Service and the disruption budget select the Deployment's pods; the probes and Prometheus annotations
    name routes the service has; two replicas, one kept through drains and rolling updates."""
    from meterflow.serve.app import create_app

    (deployment,) = _of_kind(resources, "Deployment")
    (service,) = _of_kind(resources, "Service")
    (budget,) = _of_kind(resources, "PodDisruptionBudget")
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(cfg.serve.port, "http")]
    assert deployment["spec"]["replicas"] > budget["spec"]["minAvailable"] >= 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (container,) = template["spec"]["containers"]
    # The first start may build the rollup before the service listens: minutes before liveness counts.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] < template["spec"]["terminationGracePeriodSeconds"]
    routes = {getattr(r, "path", None) for r in create_app(cfg, None, None, None).routes}  # type: ignore[arg-type]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
        assert container[probe]["httpGet"]["path"] in routes
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes
    assert int(annotations["prometheus.io/port"]) == cfg.serve.port
