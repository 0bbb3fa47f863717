#!/usr/bin/env bash
# e2e/interop.sh: `make interop`. For each broker kind (Mosquitto, mochi-mqtt, the rmqtt 3-node
# Raft cluster), on a test bed of its own under target/interop/<broker>/testbed:
#   1. the broker probe (`sealed-ota broker check -o json`) -> probe.json (mochi also with its default
#      configuration, probe-defaults.json, see e2e/brokers/mochi/main.go)
#   2. the product e2e groups (firmware, rotation, malicious broker, resilience, rollout; on the
#      rmqtt cluster also the broker-node-loss tests) -> tests-<file>.log
# then renders docs/interop.md with target/debug/sealed-ota-interop, which fails when a test failed
# that is not listed in e2e/interop/known-failures.tsv (or a listed one passed).
#
#   SEALED_OTA_INTEROP_BROKERS="mochi"  e2e/interop.sh     only some brokers (the table then has only those)
#
# The first run builds mochi (seconds) and rmqtt's release profile (about 14 minutes on 2 cores), cached in
# ~/.cache/sealed-ota. Every process a test bed started is stopped by pid (e2e/testbed down).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
BROKERS="${SEALED_OTA_INTEROP_BROKERS:-mosquitto mochi rmqtt-cluster}"
OUT="$REPO/target/interop"
TEST_FILES=(product_firmware product_rotation product_malicious_broker product_resilience product_rollout)
CARGO="${CARGO:-cargo}"
E2E_CRATES=(--workspace --exclude sealed-ota-protocol)

log() { echo "interop: $*" >&2; }

"$CARGO" build "${E2E_CRATES[@]}" --locked --bins --tests
"$CARGO" build --locked -p sealed-ota-cli --bin sealed-ota
CHECK="$REPO/target/debug/sealed-ota"

# probe OUT.json URLS: the broker probe with the test bed's client certificate.
probe() {
  local out=$1 urls=$2 rc=0
  "$CHECK" broker check -o json --broker "$urls" --ca "$SEALED_OTA_CA_FILE" --cert "$SEALED_OTA_CLIENT_CERT" \
    --key "$SEALED_OTA_CLIENT_KEY" >"$out" 2>"${out%.json}.txt" || rc=$?
  # 2: the probe ran and found a broken feature (that is a finding, not an error).
  if ((rc != 0 && rc != 2)); then log "probe failed ($rc): $(cat "${out%.json}.txt")"; rm -f "$out"; fi
  cat "${out%.json}.txt" >&2
}

# mochi with its default configuration (PUBACKs inherit the PUBLISH's properties), probed once.
probe_mochi_defaults() {
  local dir=$1 port pid
  port=$("$REPO/scripts/free-ports")
  "$SEALED_OTA_BROKER_BIN" -inherit-ack-properties -tls "127.0.0.1:$port" -ca "$SEALED_OTA_CA_FILE" \
    -cert "$SEALED_OTA_TESTBED_DIR/pki/mosquitto.crt" -key "$SEALED_OTA_TESTBED_DIR/pki/mosquitto.key" \
    >"$dir/mochi-defaults.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 50); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null && break
    sleep 0.1
  done
  probe "$dir/probe-defaults.json" "mqtts://127.0.0.1:$port" || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

for broker in $BROKERS; do
  dir="$OUT/$broker"
  rm -rf "$dir"
  mkdir -p "$dir"
  export SEALED_OTA_TESTBED_DIR="$dir/testbed"
  log "$broker: test bed up"
  "$REPO/e2e/testbed" up --broker "$broker"
  eval "$("$REPO/e2e/testbed" env)"
  echo "$broker" >"$dir/broker"
  echo "$SEALED_OTA_BROKER_VERSION" >"$dir/version"
  log "$broker $SEALED_OTA_BROKER_VERSION: broker probe"
  probe "$dir/probe.json" "$SEALED_OTA_MQTTS_URLS"
  if [[ "$broker" == mochi ]]; then probe_mochi_defaults "$dir"; fi
  files=("${TEST_FILES[@]}")
  extra=()
  if [[ "$broker" == rmqtt-cluster ]]; then files+=(product_broker_cluster); extra=(--include-ignored); fi
  for file in "${files[@]}"; do
    log "$broker: $file"
    "$CARGO" test "${E2E_CRATES[@]}" --locked --test "$file" -- "${extra[@]}" >"$dir/tests-$file.log" 2>&1 || true
    grep -E '^test .* \.\.\. ' "$dir/tests-$file.log" >&2 || tail -5 "$dir/tests-$file.log" >&2
  done
  log "$broker: test bed down"
  "$REPO/e2e/testbed" down
done

target/debug/sealed-ota-interop "$OUT" "$REPO/docs/interop.md"
