#!/usr/bin/env bash
# make demo: the whole product end to end, on real parts, on this machine.
#
# A test bed of its own (etcd + kube-apiserver + Mosquitto), the CRDs, the PKI in Secrets, an
# offline release key, the operator, DEMO_DEVICES emulated devices over TLS enrolled with the
# release public key, and the release-signed campaign in examples/ applied with kubectl (first as a
# dry run: the plan is printed, then dryRun is set to false and that plan starts). A spy
# subscribed to '#' records everything the broker relays; at the end it is scanned for the image's
# plaintext, for private keys and for every content, session and delivered key the devices logged.
# Every process started here is stopped here.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DEVICES="${DEMO_DEVICES:-20}"
IMAGE_KIB="${DEMO_IMAGE_KIB:-512}"
TIMEOUT="${DEMO_TIMEOUT:-300}"
WORK="$REPO/target/demo"
NS=sealed-ota-demo
CAMPAIGN=firmware-1-1-0
VERSION=1.1.0
BIN="$REPO/target/debug"
export SEALED_OTA_TESTBED_DIR="$WORK/testbed"

say() { echo "demo: $*" >&2; }
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  e2e/testbed down >/dev/null 2>&1 || true
  if ((rc != 0)); then say "failed; logs kept in $WORK/logs"; fi
  exit $rc
}
trap cleanup EXIT
fail() { say "FAILED: $*"; exit 1; }

rm -rf "$WORK"; mkdir -p "$WORK/logs"
say "building the operator and the device emulator"
cargo build --locked -q -p sealed-ota-operator -p sealed-ota-device-emulator -p sealed-ota-cli --bins
command -v mosquitto_sub >/dev/null || {
  say "installing Debian's mosquitto-clients (for the spy)"
  env DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto-clients >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && env DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto-clients >/dev/null; }
}

say "starting the test bed (kube-apiserver + etcd + Mosquitto)"
e2e/testbed up
eval "$(e2e/testbed env)"
MQTT_PORT="${SEALED_OTA_MQTT_URL##*:}"

# The spy: what the broker relays, every topic, from before the first device connects.
mosquitto_sub -V mqttv5 -h 127.0.0.1 -p "$MQTT_PORT" -t '#' -F '%t %x' >"$WORK/spy.hex" 2>"$WORK/logs/spy.log" &
PIDS+=($!)

say "applying the CRDs"
kubectl apply -f crds/ >/dev/null
kubectl wait --for condition=established --timeout=60s crd/devices.ota.sealed-ota.dev crd/updatecampaigns.ota.sealed-ota.dev crd/campaignshards.ota.sealed-ota.dev >/dev/null
kubectl create namespace "$NS" >/dev/null

say "making the offline release key (sealed-ota release keygen)"
"$BIN/sealed-ota" release keygen --out "$WORK/release" >"$WORK/logs/release-keygen.log"
RELEASE_KEY_ID=$(sed -n 's/^release key  *//p' "$WORK/logs/release-keygen.log")

say "bootstrapping the PKI into Secrets and enrolling $DEVICES devices, trusting the release key (sealed-ota pki init, device enroll)"
"$BIN/sealed-ota" pki init --ca-cert "$SEALED_OTA_CA_FILE" --ca-key "$SEALED_OTA_CA_KEY_FILE" \
  --out "$WORK/pki" -n "$NS" --apply >"$WORK/logs/pki-init.log" 2>&1 || { cat "$WORK/logs/pki-init.log" >&2; fail "pki-init"; }
"$BIN/sealed-ota" device enroll --ca-cert "$SEALED_OTA_CA_FILE" --ca-key "$SEALED_OTA_CA_KEY_FILE" \
  --fleet "$WORK/fleet" --count "$DEVICES" --label fleet=demo --release-key "$WORK/release/release.pub" \
  -n "$NS" --apply >"$WORK/logs/enroll.log" 2>&1 ||
  { cat "$WORK/logs/enroll.log" >&2; fail "enroll"; }

say "making a ${IMAGE_KIB} KiB firmware image and its ConfigMap"
python3 - "$WORK/firmware-$VERSION.bin" "$IMAGE_KIB" <<'EOF'
import hashlib, sys
path, kib = sys.argv[1], int(sys.argv[2])
# Recognisable, non-repeating content: a spy that saw any of it would be caught by the scan.
out, i = bytearray(), 0
while len(out) < kib * 1024:
    out += b"SEALED-OTA FIRMWARE 1.1.0 block %08d " % i + hashlib.sha256(b"%d" % i).digest()
    i += 1
open(path, "wb").write(bytes(out[: kib * 1024]))
EOF
kubectl -n "$NS" create configmap "firmware-$VERSION" --from-file=image.bin="$WORK/firmware-$VERSION.bin" >/dev/null
say "signing it with the release key (sealed-ota release sign)"
"$BIN/sealed-ota" release sign --key "$WORK/release/release.key" --image "$WORK/firmware-$VERSION.bin" \
  --version "$VERSION" --out "$WORK/firmware-$VERSION.sig.json" >/dev/null
read -r RELEASE_PUBLIC_KEY RELEASE_SIGNATURE < <(python3 -c '
import json, sys
s = json.load(open(sys.argv[1]))["releaseSignature"]
print(s["publicKey"], s["signature"])' "$WORK/firmware-$VERSION.sig.json")

say "starting the operator"
METRICS_PORT=$("$REPO/scripts/free-ports")
"$BIN/sealed-ota-operator" run --broker-url "$SEALED_OTA_MQTTS_URL" --broker-ca-file "$SEALED_OTA_CA_FILE" \
  --broker-cert-file "$WORK/pki/manager.crt" --broker-key-file "$WORK/pki/manager.key" \
  --operator-namespace "$NS" --namespace "$NS" --metrics-addr "127.0.0.1:$METRICS_PORT" \
  --cache-dir "$WORK/cache" >"$WORK/logs/operator.log" 2>&1 &
PIDS+=($!)

say "connecting $DEVICES emulated devices over TLS"
"$BIN/sealed-ota-device-emulator" run --fleet "$WORK/fleet" --broker "$SEALED_OTA_MQTTS_URL" \
  --broker-ca "$SEALED_OTA_CA_FILE" --no-progress --json --key-log "$WORK/keys.log" \
  >"$WORK/emulator.json" 2>"$WORK/logs/emulator.log" &
EMULATOR=$!
PIDS+=("$EMULATOR")

say "applying examples/firmware-campaign-release-signed.yaml (with the signature just made) as a dry run"
sed -e "s/RELEASE_PUBLIC_KEY/$RELEASE_PUBLIC_KEY/" -e "s/RELEASE_SIGNATURE/$RELEASE_SIGNATURE/" \
  -e 's/^spec:$/spec:\n  dryRun: true/' \
  examples/firmware-campaign-release-signed.yaml | kubectl -n "$NS" apply -f - >/dev/null
# The plan before it starts: status.plan (waves, devices left out and why, bytes on the broker)
# and the policy warnings; no device is touched until dryRun is false.
deadline=$((SECONDS + TIMEOUT))
until [[ -n "$(kubectl -n "$NS" get updatecampaign "$CAMPAIGN" \
  -o jsonpath='{.status.plan.estimatedBrokerBytes}' 2>/dev/null)" ]]; do
  ((SECONDS < deadline)) || fail "no plan after ${TIMEOUT}s (operator log: $WORK/logs/operator.log)"
  sleep 1
done
say "the plan (spec.dryRun: true; nothing touched yet):"
kubectl -n "$NS" get updatecampaign "$CAMPAIGN" -o json | python3 -c '
import json, sys
s = json.load(sys.stdin)["status"]
p = s["plan"]
print("  phase %s: %d devices, about %d bytes on the broker" % (s["phase"], p["devices"], p["estimatedBrokerBytes"]))
for w in p["waves"]:
    print("  wave %d: %d devices, first %s" % (w["wave"], w["size"], ", ".join(w.get("firstDevices", []))))
for e in p.get("excluded", []):
    print("  left out (%s): %d" % (e["reason"], e["count"]))
for w in s.get("warnings", []):
    print("  warning: " + w)
' >&2
say "starting that plan (spec.dryRun: false)"
START=$(date +%s.%N)
kubectl -n "$NS" patch updatecampaign "$CAMPAIGN" --type merge -p '{"spec":{"dryRun":false}}' >/dev/null
deadline=$((SECONDS + TIMEOUT))
phase=""
while :; do
  read -r phase progress < <(kubectl -n "$NS" get updatecampaign "$CAMPAIGN" \
    -o jsonpath='{.status.phase} {.status.progress}{"\n"}' 2>/dev/null || echo "- -")
  printf '\rdemo: campaign %s: phase %-12s progress %-8s' "$CAMPAIGN" "${phase:--}" "${progress:--}" >&2
  case "$phase" in Succeeded | Completed | Failed | Aborted) break ;; esac
  ((SECONDS < deadline)) || { echo >&2; fail "campaign not finished after ${TIMEOUT}s (operator log: $WORK/logs/operator.log)"; }
  sleep 1
done
END=$(date +%s.%N)
echo >&2
ELAPSED=$(python3 -c "print(f'{$END - $START:.1f}')")

kubectl -n "$NS" get updatecampaigns
kubectl -n "$NS" get devices -o custom-columns=DEVICE:.metadata.name,VERSION:.status.runningVersion,CAMPAIGN:.status.campaign.phase,RELEASEKEY:.status.campaign.releaseKeyId --no-headers >"$WORK/devices.txt"
UPDATED=$(awk -v v="$VERSION" -v k="$RELEASE_KEY_ID" '$2 == v && $4 == k' "$WORK/devices.txt" | wc -l)
CAMPAIGN_KEY=$(kubectl -n "$NS" get updatecampaign "$CAMPAIGN" -o jsonpath='{.status.releaseKeyId}')
[[ "$CAMPAIGN_KEY" == "$RELEASE_KEY_ID" ]] || fail "campaign status names release key '$CAMPAIGN_KEY', not $RELEASE_KEY_ID"
if [[ "$phase" != Succeeded ]]; then
  kubectl -n "$NS" get updatecampaign "$CAMPAIGN" -o jsonpath='{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}' >&2
  fail "campaign ended $phase: $UPDATED/$DEVICES devices updated"
fi

# Every device's installed image must be the source, byte for byte.
mismatched=0
for dir in "$WORK"/fleet/devices/*/; do
  cmp -s "$dir/firmware.bin" "$WORK/firmware-$VERSION.bin" || mismatched=$((mismatched + 1))
done

kill "${PIDS[0]}" 2>/dev/null || true # stop the spy before scanning what it saw
sleep 0.5
SCAN=$(python3 - "$WORK/spy.hex" "$WORK/firmware-$VERSION.bin" "$WORK/pki" "$WORK/fleet" "$WORK/keys.log" <<'EOF'
import glob, sys, subprocess
spy, image_path, pki, fleet, keylog = sys.argv[1:6]
seen = b"".join(bytes.fromhex(line.split(" ", 1)[1].strip()) for line in open(spy) if " " in line)
image = open(image_path, "rb").read()
# Any 32-byte window of the image, at every 16-byte offset, and the readable marker.
windows = {image[i:i + 32] for i in range(0, len(image) - 32, 16)}
leaks = [w for w in windows if w in seen]
if b"SEALED-OTA FIRMWARE" in seen:
    leaks.append(b"marker")
# Private keys: the raw 32-byte scalars of the manager's and every device's key. A key that
# cannot be read makes the scan fail rather than silently checking nothing.
keys = glob.glob(f"{pki}/*.key") + glob.glob(f"{fleet}/devices/*/key.pem")
key_leaks, parsed = 0, 0
for k in keys:
    text = subprocess.run(["openssl", "pkey", "-in", k, "-noout", "-text"], capture_output=True, text=True).stdout
    if "priv:" not in text:
        continue
    hexpriv = "".join(text.split("priv:")[1].split("pub:")[0].split()).replace(":", "")
    raw = bytes.fromhex(hexpriv)[-32:]
    if len(raw) == 32:
        parsed += 1
        key_leaks += raw in seen
if parsed != len(keys) or not keys:
    key_leaks = -1
# Content keys and session keys, as the devices logged them (emulator --key-log, tests only).
secrets = {bytes.fromhex(line.split()[2]) for line in open(keylog) if len(line.split()) == 3}
if not any(line.startswith("content-key") for line in open(keylog)):
    key_leaks = -1
keys_checked = len(keys) + len(secrets)
key_leaks = key_leaks if key_leaks < 0 else key_leaks + sum(s in seen for s in secrets)
print(f"{len(seen)} {len(leaks)} {keys_checked} {key_leaks}")
EOF
)
read -r SEEN_BYTES PLAINTEXT_LEAKS KEYS_CHECKED KEY_LEAKS <<<"$SCAN"
say "spy saw $SEEN_BYTES bytes; image windows found: $PLAINTEXT_LEAKS; private, content and session keys checked: $KEYS_CHECKED, found: $KEY_LEAKS"
((SEEN_BYTES > IMAGE_KIB * 1024)) || fail "the spy saw only $SEEN_BYTES bytes: it did not observe the transfer"
((mismatched == 0)) || fail "$mismatched devices hold an image that differs from the source"
((KEY_LEAKS >= 0)) || fail "could not read every private key to scan for it"
((PLAINTEXT_LEAKS == 0 && KEY_LEAKS == 0)) || fail "the broker saw plaintext ($PLAINTEXT_LEAKS image windows, $KEY_LEAKS keys)"
echo "demo: $UPDATED/$DEVICES devices updated to $VERSION (release key ${RELEASE_KEY_ID:0:16}) in $ELAPSED s; broker saw no plaintext"
