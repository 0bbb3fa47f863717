#!/usr/bin/env bash
# e2e/kind/kind.sh: Sealed OTA on a real Kubernetes cluster (kind), built on this machine.
#
#   e2e/kind/kind.sh up        Docker, the node image (e2e/kind/node-image.sh), the kind cluster, the
#                              images (scripts/images.sh) loaded into it, namespaces with the
#                              restricted Pod Security Standard enforced, PKI, Mosquitto with TLS,
#                              `helm install` of the chart with 2 operator replicas
#   e2e/kind/kind.sh devices   emulated devices as a pod in namespace fleet
#   e2e/kind/kind.sh campaign  a firmware campaign and a credential rotation, each to Ready
#   e2e/kind/kind.sh check     the in-cluster checks (e2e/tests/kind_cluster.rs): probes, metrics
#                              through the Service, Events, printer columns, leader failover mid-
#                              campaign, an evicted operator and a killed emulator resuming
#   e2e/kind/kind.sh test      the e2e suite (every crate's tests/) against this cluster;
#                              KIND_SUITE=all (default), none, or test target names
#                              (KIND_SUITE="smoke product_firmware") picks what runs
#   e2e/kind/kind.sh all       up, devices, campaign, check, test
#   e2e/kind/kind.sh down      delete the cluster and its network; stop what `up` started (the
#                              daemon, the OCI registry the suite uses)
#
# Offline by default: every image is built here (SEALED_OTA_KIND_IMAGES=offline). With registry
# access, SEALED_OTA_KIND_IMAGES=registry uses kind's default node image, the Dockerfiles as they
# are and Docker Hub's eclipse-mosquitto instead. State (PKI, kubeconfig, logs, ports) lives in
# $SEALED_OTA_KIND_DIR (default <repo>/target/kind); caches in ~/.cache/sealed-ota.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$REPO/e2e/kind"
STATE="${SEALED_OTA_KIND_DIR:-$REPO/target/kind}"
CLUSTER="${SEALED_OTA_KIND_CLUSTER:-sealed-ota}"
MODE="${SEALED_OTA_KIND_IMAGES:-offline}"
TAG="${SEALED_OTA_IMAGE_TAG:-dev}"
# Cargo profile of the binaries in the offline images (debug reuses a `make e2e` build).
PROFILE="${SEALED_OTA_KIND_PROFILE:-release}"
OPERATOR_IMAGE="sealed-ota/sealed-ota-operator:$TAG"
EMULATOR_IMAGE="sealed-ota/sealed-ota-device-emulator:$TAG"
MOSQUITTO_IMAGE="sealed-ota/mosquitto:$TAG"
OPERATOR_NS=sealed-ota-system
FLEET_NS=fleet
MQTT_NS=mqtt
CAMPAIGN=firmware-1-1-0
ROTATION=rotate-credentials-2027
TIMEOUT="${SEALED_OTA_KIND_TIMEOUT:-600}"
# What `test` runs: all (every crate's tests/), none, or test target names separated by spaces.
SUITE="${KIND_SUITE:-all}"
# Mosquitto's test listeners (plain 1883, TLS without ACL 8884) as NodePorts, mapped by kind to
# free loopback ports of this machine.
NODEPORT_MQTT=30883
NODEPORT_MQTTS=30884

# shellcheck source=scripts/lib.sh
source "$REPO/scripts/lib.sh"
# shellcheck source=e2e/registry/registry.sh
source "$REPO/e2e/registry/registry.sh"

log() { echo "kind: $*" >&2; }
die() { echo "kind: error: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null || die "$1 is not installed (${2:-})"; }
timed() { local t0=$SECONDS; "$@"; log "$1 took $((SECONDS - t0)) s"; }

kctl() { kubectl --kubeconfig "$STATE/kubeconfig" "$@"; }
helm_bin() { "$REPO/scripts/helm-install.sh"; }

# --- Docker and kind -----------------------------------------------------------------------------
docker_up() {
  "$REPO/scripts/docker.sh" up "$STATE"
  DOCKER="$("$REPO/scripts/docker.sh" cli)"
  export SEALED_OTA_REAL_DOCKER="$DOCKER"
  # kind runs `docker`: the shim where --privileged cannot work, else the client scripts/docker.sh picked.
  mkdir -p "$STATE/bin"
  if "$REPO/scripts/docker.sh" privileged; then
    ln -sf "$DOCKER" "$STATE/bin/docker"
  else
    ln -sf "$HERE/shim/docker" "$STATE/bin/docker"
  fi
  export PATH="$STATE/bin:$PATH"
  KIND="$("$HERE/node-image.sh" kind)"
}

kind_() { "$KIND" "$@"; }

cluster_exists() { kind_ get clusters 2>/dev/null | grep -qx "$CLUSTER"; }

# kind's config for this run: the node image's needs and the loopback ports of Mosquitto's test
# listeners (chosen free once, kept in $STATE for later steps).
write_kind_config() {
  local mqtt mqtts
  { read -r mqtt; read -r mqtts; } < <(free_port 2)
  echo "$mqtt" >"$STATE/mqtt.hostport"; echo "$mqtts" >"$STATE/mqtts.hostport"
  {
    cat "$HERE/kind-config.yaml"
    if [[ "$MODE" == offline ]]; then
      # The offline node image has no kindnetd (see node-image.sh); its etcd is the version the
      # Kubernetes module pins.
      cat <<EOF
networking:
  disableDefaultCNI: true
kubeadmConfigPatches:
  - |
    kind: ClusterConfiguration
    etcd:
      local:
        imageTag: $(grep -m1 '^ETCD_TAG=' "$HERE/node-image.sh" | cut -d= -f2)
EOF
    fi
    cat <<EOF
nodes:
  - role: control-plane
    extraPortMappings:
      - { containerPort: $NODEPORT_MQTT, hostPort: $mqtt, listenAddress: 127.0.0.1 }
      - { containerPort: $NODEPORT_MQTTS, hostPort: $mqtts, listenAddress: 127.0.0.1 }
EOF
  } >"$STATE/kind-config.yaml"
}

create_cluster() {
  if cluster_exists; then
    [[ -f "$STATE/kubeconfig" && -f "$STATE/kind-config.yaml" ]] && return
    # A cluster of this name whose state (kubeconfig, chosen ports) this checkout does not hold was
    # made from another checkout or survived a removed target/: its port mappings are unknown here.
    log "cluster $CLUSTER exists but $STATE has no state for it (made from another checkout?):" \
      "deleting and recreating it (SEALED_OTA_KIND_CLUSTER=<name> runs a second cluster instead)"
    kind_ delete cluster --name "$CLUSTER"
  fi
  local image=()
  if [[ "$MODE" == offline ]]; then
    image=(--image "$("$HERE/node-image.sh")")
  fi
  # kind bind-mounts /lib/modules; remember whether it existed so `down` removes only what Docker made.
  [[ -e /lib/modules ]] || touch "$STATE/created-lib-modules"
  write_kind_config
  log "creating kind cluster $CLUSTER"
  kind_ create cluster --name "$CLUSTER" --config "$STATE/kind-config.yaml" --kubeconfig "$STATE/kubeconfig" \
    --wait 180s "${image[@]}"
  # kind's --wait covers the node only: the first pods need the default ServiceAccount and DNS.
  local deadline=$((SECONDS + 120))
  until kctl -n default get serviceaccount default >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "no default ServiceAccount after 120 s"
    sleep 1
  done
  kctl -n kube-system rollout status deployment/coredns --timeout=180s
}

build_images() {
  if [[ "$MODE" == offline ]]; then
    "$REPO/scripts/images.sh" build --profile "$PROFILE" --tag "$TAG"
    "$REPO/scripts/images.sh" mosquitto --tag "$TAG"
  else
    "$DOCKER" build -f "$REPO/docker/operator.Dockerfile" -t "$OPERATOR_IMAGE" "$REPO"
    "$DOCKER" build -f "$REPO/docker/device-emulator.Dockerfile" -t "$EMULATOR_IMAGE" "$REPO"
    "$DOCKER" pull docker.io/library/eclipse-mosquitto:2.0.22
    "$DOCKER" tag docker.io/library/eclipse-mosquitto:2.0.22 "$MOSQUITTO_IMAGE"
  fi
  kind_ load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$EMULATOR_IMAGE" "$MOSQUITTO_IMAGE"
}

# --- PKI -----------------------------------------------------------------------------------------
# One CA (EC P-256, PKCS#8 key) signs Mosquitto's server certificate, the e2e suite's MQTT client
# certificate, and (through pki-init) the manager and every device. The layout matches the test bed's
# ($STATE/testbed/pki), so the e2e suite runs unchanged against this cluster.
make_pki() {
  local p="$STATE/testbed/pki"
  [[ -f "$p/ca.crt" ]] && return
  mkdir -p "$p"
  openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$p/ca.key"
  openssl req -x509 -new -key "$p/ca.key" -subj "/CN=sealed-ota-kind-ca" -days 3650 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$p/ca.crt" 2>/dev/null
  issue() { # name subject eku [san]
    local name=$1 subj=$2 eku=$3 san=${4:-} ext="$p/$1.ext"
    openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$p/$name.key"
    { echo "basicConstraints=critical,CA:FALSE"; echo "keyUsage=critical,digitalSignature,keyEncipherment"
      echo "extendedKeyUsage=$eku"; [[ -n "$san" ]] && echo "subjectAltName=$san"; } >"$ext"
    openssl req -new -key "$p/$name.key" -subj "$subj" 2>/dev/null |
      openssl x509 -req -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -days 825 -extfile "$ext" \
        -out "$p/$name.crt" 2>/dev/null
    rm -f "$ext"
  }
  issue mosquitto "/CN=mosquitto" serverAuth \
    "DNS:mosquitto.$MQTT_NS.svc.cluster.local,DNS:mosquitto.$MQTT_NS.svc,DNS:localhost,IP:127.0.0.1"
  issue mqtt-client "/CN=testbed-client" clientAuth
  chmod 600 "$p"/*.key
}

# --- up ------------------------------------------------------------------------------------------
cmd_up() {
  need kubectl; need openssl; need npm "for helm"; need python3
  mkdir -p "$STATE/logs"
  docker_up
  timed create_cluster
  mkdir -p "$STATE/testbed"
  cp "$STATE/kubeconfig" "$STATE/testbed/kubeconfig"
  timed build_images

  make_pki
  local p="$STATE/testbed/pki" ns
  # The restricted Pod Security Standard on every namespace of the product: a pod that asks for
  # more than it may is refused, not warned about.
  for ns in "$OPERATOR_NS" "$FLEET_NS" "$MQTT_NS"; do
    kctl create namespace "$ns" --dry-run=client -o yaml | kctl apply -f - >/dev/null
    kctl label --overwrite namespace "$ns" pod-security.kubernetes.io/enforce=restricted \
      pod-security.kubernetes.io/enforce-version=latest pod-security.kubernetes.io/warn=restricted >/dev/null
  done

  log "issuing the manager identity (pki-init in the emulator image)"
  mkdir -p "$STATE/manager"
  "$DOCKER" run --rm --network=none -u "$(id -u):$(id -g)" -v "$p:/pki:ro" -v "$STATE/manager:/out" "$EMULATOR_IMAGE" \
    pki-init --ca-cert /pki/ca.crt --ca-key /pki/ca.key --out /out --manager-id manager \
    --namespace "$FLEET_NS" --yaml /out/secrets.yaml
  kctl apply --server-side -f "$STATE/manager/secrets.yaml" >/dev/null

  log "starting Mosquitto (namespace $MQTT_NS)"
  kctl -n "$MQTT_NS" create secret generic mosquitto-tls --from-file=ca.crt="$p/ca.crt" \
    --from-file=server.crt="$p/mosquitto.crt" --from-file=server.key="$p/mosquitto.key" \
    --dry-run=client -o yaml | kctl apply -f - >/dev/null
  sed "s#image: sealed-ota/mosquitto:dev#image: $MOSQUITTO_IMAGE#" "$HERE/manifests/mosquitto.yaml" | kctl apply -f - >/dev/null
  kctl -n "$MQTT_NS" rollout status deployment/mosquitto --timeout=180s

  log "installing the chart (namespace $OPERATOR_NS)"
  # The operator's broker client certificate is the manager certificate (CN "manager" in the ACL).
  kctl -n "$OPERATOR_NS" create secret generic broker-tls --from-file=ca.crt="$p/ca.crt" \
    --from-file=tls.crt="$STATE/manager/manager.crt" --from-file=tls.key="$STATE/manager/manager.key" \
    --dry-run=client -o yaml | kctl apply -f - >/dev/null
  HELM_CACHE_HOME="$STATE/helm/cache" HELM_CONFIG_HOME="$STATE/helm/config" HELM_DATA_HOME="$STATE/helm/data" \
    KUBECONFIG="$STATE/kubeconfig" "$(helm_bin)" upgrade --install sealed-ota "$REPO/charts/sealed-ota" \
    --namespace "$OPERATOR_NS" --values "$HERE/values-kind.yaml" --set "image.tag=$TAG" --wait --timeout 5m
  kctl -n "$OPERATOR_NS" rollout status deployment/sealed-ota --timeout=180s
  write_testbed
  log "up: KUBECONFIG=$STATE/kubeconfig"
}

# The e2e suite finds its cluster through `e2e/testbed env`, which reads $SEALED_OTA_TESTBED_DIR:
# this fills such a directory for the kind cluster (kubeconfig, the PKI above, Mosquitto's test
# listeners on their loopback ports, the test bed's OCI registry). The node container's init process
# stands for the test bed's server processes: `e2e/testbed env` reports the cluster up while it runs.
write_testbed() {
  local t="$STATE/testbed" pid
  # Marks the directory as kind's: `e2e/testbed up|down` refuse it (their pid files name the node).
  echo "$CLUSTER" >"$t/kind.cluster"
  cp "$STATE/mqtt.hostport" "$t/mqtt.port"
  cp "$STATE/mqtts.hostport" "$t/mqtts.port"
  pid=$("$DOCKER" inspect --format '{{.State.Pid}}' "$CLUSTER-control-plane")
  for name in etcd apiserver mosquitto; do echo "$pid" >"$t/$name.pid"; done
  testbed_registry up
}

# The test bed's OCI registry (e2e/registry/registry.sh) with its state in the test-bed directory,
# on this machine's loopback as on the test bed: the suite's operators run here, not in the cluster.
testbed_registry() { # up|down
  local STATE="$STATE/testbed"
  case $1 in
    up)
      pid_alive "$STATE/registry.pid" && return
      registry_install
      registry_start
      registry_wait
      log "OCI registry $(cat "$STATE/registry.addr") (pid $(cat "$STATE/registry.pid"))"
      ;;
    down) registry_stop ;;
  esac
}

# --- devices -------------------------------------------------------------------------------------
cmd_devices() {
  docker_up
  log "starting the emulated devices (namespace $FLEET_NS)"
  sed "s#image: sealed-ota/sealed-ota-device-emulator:dev#image: $EMULATOR_IMAGE#" "$HERE/manifests/devices.yaml" |
    kctl apply -f - >/dev/null
  kctl -n "$FLEET_NS" rollout status deployment/device-emulator --timeout=300s
  # The init container applied 20 Devices; their agents report in once connected.
  local deadline=$((SECONDS + 120))
  until (($(kctl -n "$FLEET_NS" get devices.ota.sealed-ota.dev -o name | wc -l) >= 20)); do
    ((SECONDS < deadline)) || die "fewer than 20 Devices after 120 s"
    sleep 1
  done
  kctl -n "$FLEET_NS" get devices.ota.sealed-ota.dev
}

# --- campaign ------------------------------------------------------------------------------------
wait_ready() { # campaign
  # kstatus-style: Ready=True for the current generation (what Flux waits for).
  kctl -n "$FLEET_NS" wait "updatecampaign/$1" --for=condition=Ready --timeout="${TIMEOUT}s" || {
    kctl -n "$FLEET_NS" get updatecampaign "$1" -o yaml >&2
    die "campaign $1 not Ready after ${TIMEOUT}s"
  }
}

cmd_campaign() {
  log "firmware image and campaign $CAMPAIGN"
  mkdir -p "$STATE/firmware"
  [[ -f "$STATE/firmware/image.bin" ]] || head -c 524288 /dev/urandom >"$STATE/firmware/image.bin"
  kctl -n "$FLEET_NS" create configmap firmware-1.1.0 --from-file=image.bin="$STATE/firmware/image.bin" \
    --dry-run=client -o yaml | kctl apply --server-side -f - >/dev/null
  kctl -n "$FLEET_NS" apply -f "$REPO/examples/firmware-campaign.yaml"
  wait_ready "$CAMPAIGN"
  log "credential rotation $ROTATION"
  kctl -n "$FLEET_NS" apply -f "$REPO/examples/rotate-credentials-campaign.yaml"
  wait_ready "$ROTATION"
  kctl -n "$FLEET_NS" get updatecampaigns
}

# --- check ---------------------------------------------------------------------------------------
cmd_check() {
  need cargo
  docker_up
  log "in-cluster checks (e2e/tests/kind_cluster.rs)"
  cd "$REPO"
  SEALED_OTA_KIND_DIR="$STATE" SEALED_OTA_KIND_CLUSTER="$CLUSTER" SEALED_OTA_REAL_DOCKER="$DOCKER" \
    cargo test --locked -p sealed-ota-e2e --test kind_cluster -- --ignored --test-threads=1
}

# --- test ----------------------------------------------------------------------------------------
cmd_test() {
  if [[ "$SUITE" == none ]]; then
    log "KIND_SUITE=none: the e2e suite is not run against the cluster"
    return
  fi
  local targets=(--test '*') name
  if [[ "$SUITE" != all ]]; then
    targets=()
    for name in $SUITE; do targets+=(--test "$name"); done
  fi
  need cargo
  docker_up
  # The agent's tests drive real RAUC and Mender update modules (as `make e2e` installs them).
  "$REPO/scripts/install-agent-test-deps.sh"
  write_testbed
  export SEALED_OTA_TESTBED_DIR="$STATE/testbed"
  eval "$("$REPO/e2e/testbed" env)"
  log "running the e2e suite ($SUITE) against kind cluster $CLUSTER (KUBECONFIG=$KUBECONFIG)"
  cd "$REPO"
  cargo build --locked -p sealed-ota-operator -p sealed-ota-device-emulator --bins
  # Every crate's integration tests (tests/ directories), as `make e2e` runs them on the test bed,
  # or the ones KIND_SUITE names.
  cargo test --workspace --locked --no-fail-fast "${targets[@]}" -- --test-threads=2
}

# --- down ----------------------------------------------------------------------------------------
cmd_down() {
  if [[ -x "$(command -v "$REPO/scripts/docker.sh")" ]] && "$REPO/scripts/docker.sh" cli >/dev/null 2>&1 &&
    "$("$REPO/scripts/docker.sh" cli)" version >/dev/null 2>&1; then
    DOCKER="$("$REPO/scripts/docker.sh" cli)"
    export SEALED_OTA_REAL_DOCKER="$DOCKER"
    KIND="$("$HERE/node-image.sh" kind)"
    if cluster_exists; then kind_ delete cluster --name "$CLUSTER" --kubeconfig "$STATE/kubeconfig"; fi
    # kind leaves its Docker network behind for the next cluster: remove it unless something uses it.
    if "$DOCKER" network inspect kind >/dev/null 2>&1 &&
      [[ "$("$DOCKER" network inspect kind --format '{{len .Containers}}')" == 0 ]]; then
      "$DOCKER" network rm kind >/dev/null
    fi
    # What is left in Docker that this cluster made (nothing, unless a step above failed).
    local left
    left=$("$DOCKER" ps -a --filter "label=io.x-k8s.kind.cluster=$CLUSTER" --format '{{.Names}}')
    left+=$("$DOCKER" network ls --filter name='^kind$' --format ' network {{.Name}}')
    [[ -z "$left" ]] || log "warning: left behind: $left"
  fi
  testbed_registry down
  rm -f "$STATE/testbed/"*.pid
  "$REPO/scripts/docker.sh" down "$STATE"
  if [[ -f "$STATE/created-lib-modules" ]]; then
    rmdir /lib/modules 2>/dev/null || true
    rm -f "$STATE/created-lib-modules"
  fi
  log "down (state kept in $STATE; remove it for a fresh PKI)"
}

case "${1:-}" in
  up) cmd_up ;;
  devices) cmd_devices ;;
  campaign) docker_up; cmd_campaign ;;
  check) cmd_check ;;
  test) cmd_test ;;
  all) t0=$SECONDS; cmd_up; cmd_devices; timed cmd_campaign; timed cmd_check; timed cmd_test; log "all took $((SECONDS - t0)) s" ;;
  down) cmd_down ;;
  *) echo "usage: e2e/kind/kind.sh up|devices|campaign|check|test|all|down" >&2; exit 2 ;;
esac
