#!/usr/bin/env bash
# Install everything meterflow needs on a fresh Debian machine (idempotent; quick when warm):
#   - Debian packages: PostgreSQL server, Prometheus (with promtool), Chromium and ChromeDriver, and a JDK + Maven if missing
#   - .venv with the project and its test extras (apache-flink wheel = the Flink distribution)
#   - Kafka broker and Flink connector jars from Maven Central (third_party/*/pom.xml)
#   - Apicurio Registry (a schema registry with a Confluent-compatible API) from Maven Central (third_party/registry)
#   - ZooKeeper (Flink's high availability on the local stack) from Maven Central (third_party/zookeeper)
#   - stripe-mock (Stripe's API-validating mock) and kubeconform (validates ops/k8s/ offline) with
#     `go install`, and scripts/k8s-core-check with `go build`, into third_party/bin
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
log() { printf '[setup] %s\n' "$*" >&2; }

need_apt=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need_apt+=(postgresql)
command -v java >/dev/null || need_apt+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || need_apt+=(maven)
command -v runuser >/dev/null || need_apt+=(util-linux)
# The usage page's browser test drives Debian's Chromium through its ChromeDriver.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing Debian packages (${need_apt[*]}); run as root or install them"; exit 1
  fi
  log "apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
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
  if ! ls "third_party/$module/target/dependency/"*.jar >/dev/null 2>&1 || [ "third_party/$module/pom.xml" -nt "third_party/$module/target/dependency" ]; then
    log "downloading jars for third_party/$module from Maven Central"
    rm -rf "third_party/$module/target"
    extra=(); [ "$module" = flink-lib ] && extra=(-DexcludeTransitive=true)
    if ! (cd "third_party/$module" && mvn -q -B dependency:copy-dependencies "${extra[@]}"); then
      log "Maven download failed for third_party/$module (is Maven Central reachable?)"; exit 1
    fi
  fi
done
# The job's JVM functions (jvm/): rebuilt when a source or schema is newer than the jar.
jar=jvm/target/meterflow-jvm.jar
if [ ! -f "$jar" ] || [ -n "$(find jvm/src jvm/pom.xml avro -newer "$jar" -type f 2>/dev/null | head -1)" ]; then
  log "building jvm/ (meterflow's Flink functions)"
  if ! (cd jvm && mvn -q -B package); then
    log "building jvm/ failed"; exit 1
  fi
fi
# >>> schema registry (third_party/registry): Apicurio Registry from Maven Central, for the local stack and tests
registry_dir=third_party/registry/target/apicurio-registry
if ! ls "$registry_dir"/apicurio-registry-app-*-runner.jar >/dev/null 2>&1 || [ third_party/registry/pom.xml -nt "$registry_dir" ]; then
  log "downloading Apicurio Registry for third_party/registry from Maven Central"
  rm -rf third_party/registry/target
  if ! (cd third_party/registry && mvn -q -B dependency:copy); then
    log "Maven download failed for third_party/registry (is Maven Central reachable?)"; exit 1
  fi
  mkdir -p "$registry_dir.tmp"
  tar -xzf third_party/registry/target/apicurio-registry-app-*-all.tar.gz -C "$registry_dir.tmp"
  rm -f third_party/registry/target/apicurio-registry-app-*-all.tar.gz
  mv "$registry_dir.tmp" "$registry_dir"
fi
# <<< schema registry
# >>> zookeeper (third_party/zookeeper): Flink's high availability on the local stack, from Maven Central
if ! ls third_party/zookeeper/target/dependency/zookeeper-*.jar >/dev/null 2>&1 || [ third_party/zookeeper/pom.xml -nt third_party/zookeeper/target/dependency ]; then
  log "downloading ZooKeeper for third_party/zookeeper from Maven Central"
  rm -rf third_party/zookeeper/target
  if ! (cd third_party/zookeeper && mvn -q -B dependency:copy-dependencies); then
    log "Maven download failed for third_party/zookeeper (is Maven Central reachable?)"; exit 1
  fi
fi
# <<< zookeeper
# stripe-mock validates every billing request against Stripe's OpenAPI specification.
stripe_mock_version=v0.203.0
if [ "$(cat third_party/bin/.stripe-mock-version 2>/dev/null)" != "$stripe_mock_version" ]; then
  command -v go >/dev/null || { log "Go is required to install stripe-mock (go install)"; exit 1; }
  log "installing stripe-mock $stripe_mock_version (go install)"
  mkdir -p third_party/bin
  if ! GOBIN="$root/third_party/bin" go install "github.com/stripe/stripe-mock@$stripe_mock_version"; then
    log "go install stripe-mock failed (is the Go module proxy reachable?)"; exit 1
  fi
  echo "$stripe_mock_version" > third_party/bin/.stripe-mock-version
fi
# kubeconform validates the Kubernetes manifests of ops/k8s/ against the schemas committed beside them.
kubeconform_version=v0.7.0
if [ "$(cat third_party/bin/.kubeconform-version 2>/dev/null)" != "$kubeconform_version" ] || [ ! -x third_party/bin/kubeconform ]; then
  command -v go >/dev/null || { log "Go is required to install kubeconform (go install)"; exit 1; }
  log "installing kubeconform $kubeconform_version (go install)"
  mkdir -p third_party/bin
  if ! GOBIN="$root/third_party/bin" go install "github.com/yannh/kubeconform/cmd/kubeconform@$kubeconform_version"; then
    log "go install kubeconform failed (is the Go module proxy reachable?)"; exit 1
  fi
  echo "$kubeconform_version" > third_party/bin/.kubeconform-version
fi
# k8s-core-check decodes the core Kubernetes resources of ops/k8s/ (Deployment, Service, ...)
# strictly with the Kubernetes API's Go types (scripts/k8s-core-check/; Go's build cache makes
# a rebuild of an unchanged tool quick).
if ! (cd scripts/k8s-core-check && go build -o "$root/third_party/bin/k8s-core-check" .); then
  log "building scripts/k8s-core-check failed (is the Go module proxy reachable?)"; exit 1
fi
log "ready: $root/.venv/bin/meterflow"
