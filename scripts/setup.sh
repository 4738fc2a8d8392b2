#!/usr/bin/env bash
# Install everything meterflow needs on a fresh Debian machine (idempotent; quick when warm):
#   - Debian packages: PostgreSQL server, Prometheus (with promtool), and a JDK + Maven if missing
#   - .venv with the project and its test extras (apache-flink wheel = the Flink distribution)
#   - Kafka broker and Flink connector jars from Maven Central (stack/*/pom.xml)
#   - Apicurio Registry (a schema registry with a Confluent-compatible API) from Maven Central (stack/registry)
#   - ZooKeeper (Flink's high availability on the local stack) from Maven Central (stack/zookeeper)
#   - stripe-mock (Stripe's API-validating mock) and kubeconform (validates ops/k8s/ offline) with
#     `go install`, into stack/bin
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log() { printf '[setup] %s\n' "$*" >&2; }

need_apt=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need_apt+=(postgresql)
command -v java >/dev/null || need_apt+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || need_apt+=(maven)
command -v runuser >/dev/null || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing Debian packages (${need_apt[*]}); run as root or install them"; exit 1
  fi
  log "apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Prometheus: `meterflow stack up` runs the binary on loopback with its own config and data under the
# state directory; promtool checks the alert rules. The package's own service is not used: where
# the install started it (systemd hosts), it is stopped and disabled. Node-exporter is not needed.
if ! { [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; }; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing Debian package prometheus; run as root or install it"; exit 1
  fi
  log "apt-get install prometheus"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    log "stopping and disabling the prometheus system service (meterflow runs its own)"
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { log "Python 3.11 required (apache-flink 2.3.0 wheels); found $("$python" --version)"; exit 1; }
stamp=.venv/.meterflow-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "creating .venv and installing meterflow with test extras (the Flink wheel is large; first run takes a few minutes)"
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi

for module in kafka flink-lib profiler; do
  if ! ls "stack/$module/target/dependency/"*.jar >/dev/null 2>&1 || [ "stack/$module/pom.xml" -nt "stack/$module/target/dependency" ]; then
    log "downloading jars for stack/$module from Maven Central"
    rm -rf "stack/$module/target"
    extra=(); [ "$module" = flink-lib ] && extra=(-DexcludeTransitive=true)
    if ! (cd "stack/$module" && mvn -q -B dependency:copy-dependencies "${extra[@]}"); then
      log "Maven download failed for stack/$module (is Maven Central reachable?)"; exit 1
    fi
  fi
done
# The job's JVM functions (udf/): rebuilt when a source or schema is newer than the jar.
jar=udf/target/meterflow-udf.jar
if [ ! -f "$jar" ] || [ -n "$(find udf/src udf/pom.xml avro -newer "$jar" -type f 2>/dev/null | head -1)" ]; then
  log "building udf/ (meterflow's Flink functions)"
  if ! (cd udf && mvn -q -B package); then
    log "building udf/ failed"; exit 1
  fi
fi
# >>> schema registry (stack/registry): Apicurio Registry from Maven Central, for the local stack and tests
registry_dir=stack/registry/target/apicurio-registry
if ! ls "$registry_dir"/apicurio-registry-app-*-runner.jar >/dev/null 2>&1 || [ stack/registry/pom.xml -nt "$registry_dir" ]; then
  log "downloading Apicurio Registry for stack/registry from Maven Central"
  rm -rf stack/registry/target
  if ! (cd stack/registry && mvn -q -B dependency:copy); then
    log "Maven download failed for stack/registry (is Maven Central reachable?)"; exit 1
  fi
  mkdir -p "$registry_dir.tmp"
  tar -xzf stack/registry/target/apicurio-registry-app-*-all.tar.gz -C "$registry_dir.tmp"
  rm -f stack/registry/target/apicurio-registry-app-*-all.tar.gz
  mv "$registry_dir.tmp" "$registry_dir"
fi
# <<< schema registry
# >>> zookeeper (stack/zookeeper): Flink's high availability on the local stack, from Maven Central
if ! ls stack/zookeeper/target/dependency/zookeeper-*.jar >/dev/null 2>&1 || [ stack/zookeeper/pom.xml -nt stack/zookeeper/target/dependency ]; then
  log "downloading ZooKeeper for stack/zookeeper from Maven Central"
  rm -rf stack/zookeeper/target
  if ! (cd stack/zookeeper && mvn -q -B dependency:copy-dependencies); then
    log "Maven download failed for stack/zookeeper (is Maven Central reachable?)"; exit 1
  fi
fi
# <<< zookeeper
# stripe-mock validates every billing request against Stripe's OpenAPI specification.
stripe_mock_version=v0.203.0
if [ "$(cat stack/bin/.stripe-mock-version 2>/dev/null)" != "$stripe_mock_version" ]; then
  command -v go >/dev/null || { log "Go is required to install stripe-mock (go install)"; exit 1; }
  log "installing stripe-mock $stripe_mock_version (go install)"
  mkdir -p stack/bin
  if ! GOBIN="$root/stack/bin" go install "github.com/stripe/stripe-mock@$stripe_mock_version"; then
    log "go install stripe-mock failed (is the Go module proxy reachable?)"; exit 1
  fi
  echo "$stripe_mock_version" > stack/bin/.stripe-mock-version
fi
# kubeconform validates the Kubernetes manifests of ops/k8s/ against the schemas committed beside them.
kubeconform_version=v0.7.0
if [ "$(cat stack/bin/.kubeconform-version 2>/dev/null)" != "$kubeconform_version" ] || [ ! -x stack/bin/kubeconform ]; then
  command -v go >/dev/null || { log "Go is required to install kubeconform (go install)"; exit 1; }
  log "installing kubeconform $kubeconform_version (go install)"
  mkdir -p stack/bin
  if ! GOBIN="$root/stack/bin" go install "github.com/yannh/kubeconform/cmd/kubeconform@$kubeconform_version"; then
    log "go install kubeconform failed (is the Go module proxy reachable?)"; exit 1
  fi
  echo "$kubeconform_version" > stack/bin/.kubeconform-version
fi
log "ready: $root/.venv/bin/meterflow"
