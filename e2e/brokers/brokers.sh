# shellcheck shell=bash
# e2e/brokers/brokers.sh: the MQTT brokers of the test bed, sourced by e2e/testbed (which defines
# STATE, REPO, log, die, free_port, pid_alive and stop_pid). Each broker kind has four functions:
#   <kind>_install   build or install it once (cached outside the clone, flock-protected)
#   <kind>_start     start it on free loopback ports with the test bed's PKI; write
#                    $STATE/mqtt.urls and $STATE/mqtts.urls (one URL per node, node 1 first),
#                    mqtt.port and mqtts.port (node 1) and a pid file per process (<kind>.pid,
#                    rmqtt-N.pid per node)
#   <kind>_wait      wait until it serves (or die naming its log)
#   <kind>_version   print its version
#   <kind>_bin       print its binary's path
# Every listener pair is the same: a plain one (anonymous, for the tests' spies and rogue clients)
# and a TLS one that requires a client certificate signed by the test CA and takes the
# certificate's identity as the MQTT username.
#
#   mosquitto      Debian's package (the default)
#   mochi          mochi-mqtt (Go module github.com/mochi-mqtt/server/v2) with our small main in
#                  e2e/brokers/mochi, built once into ~/.cache/sealed-ota/mochi-<version>
#   rmqtt-cluster  three rmqtt nodes (SEALED_OTA_RMQTT_NODES) in one Raft cluster: rmqttd from crates.io
#                  with the plugins the test bed starts (e2e/brokers/rmqtt/rmqttd), built once per
#                  profile into ~/.cache/sealed-ota/rmqtt-<version>-<manifest hash>/<profile>:
#                  SEALED_OTA_RMQTT_PROFILE=release (the default; about 14 minutes cold on 2 cores)
#                  or testbed (unoptimised, about 7 minutes: `make test`'s node-loss tests)

BROKER_KINDS="mosquitto mochi rmqtt-cluster"
MOCHI_VERSION=2.7.9
RMQTT_VERSION=0.24.0
SEALED_OTA_CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/sealed-ota"
MOCHI_CACHE="${SEALED_OTA_MOCHI_CACHE:-$SEALED_OTA_CACHE_ROOT/mochi-$MOCHI_VERSION}"
RMQTT_SOURCE="$REPO/e2e/brokers/rmqtt/rmqttd"
RMQTT_CACHE="${SEALED_OTA_RMQTT_CACHE:-$SEALED_OTA_CACHE_ROOT/rmqtt-$RMQTT_VERSION-$(cat "$RMQTT_SOURCE/Cargo.toml" \
  "$RMQTT_SOURCE/Cargo.lock" "$RMQTT_SOURCE"/build.rs "$RMQTT_SOURCE"/src/*.rs | sha256sum | cut -c1-12)}"
# Nodes of the rmqtt cluster: SEALED_OTA_RMQTT_NODES (1..9, default 3) when the test bed comes up
# (`make bench-scale` runs more: each node holds fewer connections than this machine's per-process
# open-file limit); afterwards the count the running test bed recorded in $STATE/rmqtt/ports.
if [[ -f "$STATE/rmqtt/ports" ]]; then
  RMQTT_NODES=$(wc -l <"$STATE/rmqtt/ports")
else
  RMQTT_NODES=${SEALED_OTA_RMQTT_NODES:-3}
fi
# rmqttd's Cargo profile (its Cargo.toml): SEALED_OTA_RMQTT_PROFILE when the test bed comes up,
# afterwards the one it recorded in $STATE/rmqtt/profile (a node restarted later runs the same binary).
if [[ -f "$STATE/rmqtt/profile" ]]; then
  RMQTT_PROFILE=$(<"$STATE/rmqtt/profile")
else
  RMQTT_PROFILE=${SEALED_OTA_RMQTT_PROFILE:-release}
fi

broker_known() { [[ " $BROKER_KINDS " == *" $1 "* ]]; }

# apt_install PACKAGE: Debian's package, without letting its init script start a system service.
apt_install() {
  local package=$1 sudo=""
  log "installing Debian's $package"
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  printf '#!/bin/sh\nexit 101\n' >/tmp/sealed-ota-policy-rc.d
  chmod +x /tmp/sealed-ota-policy-rc.d
  local placed=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then $sudo cp /tmp/sealed-ota-policy-rc.d /usr/sbin/policy-rc.d; placed=1; fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$package" >/dev/null 2>&1 ||
    { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$package" >/dev/null; } ||
    die "could not install $package with apt-get"
  if [[ "$placed" == 1 ]]; then $sudo rm -f /usr/sbin/policy-rc.d; fi
}

# wait_listening PORT PIDFILE LOG WHAT: until 127.0.0.1:PORT accepts, or die when the process exits.
wait_listening() {
  local port=$1 pidfile=$2 logfile=$3 what=$4 deadline=$((SECONDS + 60))
  until python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null; do
    pid_alive "$pidfile" || { tail -n 20 "$logfile" >&2 || true; die "$what exited (log: $logfile)"; }
    ((SECONDS < deadline)) || die "$what not listening on $port after 60s (log: $logfile)"
    sleep 0.2
  done
}

write_urls() { # plain-port... -- tls-port...
  : >"$STATE/mqtt.urls"; : >"$STATE/mqtts.urls"
  local file="$STATE/mqtt.urls" port
  for port in "$@"; do
    if [[ "$port" == -- ]]; then file="$STATE/mqtts.urls"; continue; fi
    echo "$([[ $file == *mqtts.urls ]] && echo mqtts || echo mqtt)://127.0.0.1:$port" >>"$file"
  done
  head -1 "$STATE/mqtt.urls" | sed 's|.*:||' >"$STATE/mqtt.port"
  head -1 "$STATE/mqtts.urls" | sed 's|.*:||' >"$STATE/mqtts.port"
}

# --- mosquitto ---------------------------------------------------------------------------------
mosquitto_bin() {
  if command -v mosquitto >/dev/null; then command -v mosquitto; return; fi
  if [[ -x /usr/sbin/mosquitto ]]; then echo /usr/sbin/mosquitto; return; fi
  return 1
}

mosquitto_install() {
  mosquitto_bin >/dev/null && return
  apt_install mosquitto
  mosquitto_bin >/dev/null || die "mosquitto installed but not found on PATH or /usr/sbin"
}

mosquitto_version() { { "$(mosquitto_bin)" -h 2>&1 || true; } | sed -n 's/^mosquitto version \([^ ]*\).*/\1/p' | head -1; }

mosquitto_start() {
  local plain tls p="$STATE/pki" d="$STATE/mosquitto" bin
  bin=$(mosquitto_bin)
  { read -r plain; read -r tls; } < <(free_port 2)
  mkdir -p "$d"
  write_urls "$plain" -- "$tls"
  cat >"$d/mosquitto.conf" <<EOF
# Generated by e2e/testbed. Defaults kept where the product must cope with them
# (max_queued_messages 1000, persistence autosave), so tests see what users see.
per_listener_settings false
# Run as whoever started the test bed (mosquitto drops root to user 'mosquitto' otherwise).
user $(id -un)
allow_anonymous true
persistence true
persistence_location $d/
log_dest file $d/mosquitto.log
log_type error
log_type warning
log_type notice

listener $plain 127.0.0.1
protocol mqtt

listener $tls 127.0.0.1
protocol mqtt
cafile $p/ca.crt
certfile $p/mosquitto.crt
keyfile $p/mosquitto.key
require_certificate true
use_identity_as_username true
EOF
  # Thousands of emulated devices need thousands of descriptors; past the limit Debian's
  # mosquitto refuses connections ("denied access by tcpd").
  (ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec nohup "$bin" -c "$d/mosquitto.conf" >"$d/stdout.log" 2>&1) &
  echo $! >"$STATE/mosquitto.pid"
}

mosquitto_wait() {
  wait_listening "$(broker_port mqtts 1)" "$STATE/mosquitto.pid" "$STATE/mosquitto/mosquitto.log" mosquitto
}

# --- mochi-mqtt --------------------------------------------------------------------------------
mochi_install() {
  mkdir -p "$MOCHI_CACHE"
  exec 8>"$MOCHI_CACHE/.build.lock"
  flock 8
  local sum
  # Rebuilt when our main or its module pins change (the cache key is their hash).
  sum=$(cat "$REPO/e2e/brokers/mochi/main.go" "$REPO/e2e/brokers/mochi/go.mod" "$REPO/e2e/brokers/mochi/go.sum" | sha256sum | cut -c1-16)
  if [[ ! -x "$MOCHI_CACHE/sealed-ota-mochi-$sum" ]]; then
    command -v go >/dev/null || die "go is not installed; it is needed once to build mochi-mqtt"
    log "building mochi-mqtt $MOCHI_VERSION from its Go module (first run only)"
    (cd "$REPO/e2e/brokers/mochi" && go build -mod=readonly -trimpath -ldflags='-s -w' -o "$MOCHI_CACHE/sealed-ota-mochi.tmp" .) ||
      die "building mochi-mqtt failed"
    mv "$MOCHI_CACHE/sealed-ota-mochi.tmp" "$MOCHI_CACHE/sealed-ota-mochi-$sum"
  fi
  ln -sfn "sealed-ota-mochi-$sum" "$MOCHI_CACHE/sealed-ota-mochi"
  exec 8>&-
}

mochi_bin() { echo "$MOCHI_CACHE/sealed-ota-mochi"; }

mochi_version() { "$(mochi_bin)" -version; }

mochi_start() {
  local plain tls p="$STATE/pki" d="$STATE/mochi"
  { read -r plain; read -r tls; } < <(free_port 2)
  mkdir -p "$d"
  write_urls "$plain" -- "$tls"
  (ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    exec nohup "$(mochi_bin)" -plain "127.0.0.1:$plain" -tls "127.0.0.1:$tls" \
      -ca "$p/ca.crt" -cert "$p/mosquitto.crt" -key "$p/mosquitto.key" -data "$d/mochi.db" >"$d/mochi.log" 2>&1) &
  echo $! >"$STATE/mochi.pid"
}

mochi_wait() {
  wait_listening "$(broker_port mqtts 1)" "$STATE/mochi.pid" "$STATE/mochi/mochi.log" mochi-mqtt
}

# --- rmqtt cluster -----------------------------------------------------------------------------
rmqtt_bin() { echo "$RMQTT_CACHE/$RMQTT_PROFILE/rmqttd"; }

rmqtt_version() { echo "$RMQTT_VERSION"; }

rmqtt_cluster_install() {
  [[ "$RMQTT_PROFILE" == release || "$RMQTT_PROFILE" == testbed ]] ||
    die "SEALED_OTA_RMQTT_PROFILE: release or testbed, not '$RMQTT_PROFILE'"
  mkdir -p "$RMQTT_CACHE"
  exec 8>"$RMQTT_CACHE/.build-$RMQTT_PROFILE.lock"
  flock 8
  if [[ ! -x "$(rmqtt_bin)" ]]; then
    command -v protoc >/dev/null || apt_install protobuf-compiler
    log "building rmqttd $RMQTT_VERSION ($RMQTT_PROFILE profile) from crates.io (first run only: about 7 minutes on 2 cores for testbed, 14 for release)"
    # Its own target directory, removed afterwards: the build tree is several GiB, only the binary is kept.
    CARGO_TARGET_DIR="$RMQTT_CACHE/build-$RMQTT_PROFILE" cargo build --locked --quiet --profile "$RMQTT_PROFILE" \
      --manifest-path "$RMQTT_SOURCE/Cargo.toml" || die "building rmqttd $RMQTT_VERSION failed (output above)"
    mkdir -p "$RMQTT_CACHE/$RMQTT_PROFILE"
    mv "$RMQTT_CACHE/build-$RMQTT_PROFILE/$RMQTT_PROFILE/rmqttd" "$(rmqtt_bin)"
    rm -rf "$RMQTT_CACHE/build-$RMQTT_PROFILE"
  fi
  exec 8>&-
}
rmqtt_cluster_version() { rmqtt_version; }
rmqtt_cluster_bin() { rmqtt_bin; }

# Every node's ports, in $STATE/rmqtt/ports: "node mqtt mqtts rpc raft http" per line.
rmqtt_port() { awk -v n="$1" -v c="$2" '$1 == n { print $c }' "$STATE/rmqtt/ports"; }

rmqtt_cluster_start() {
  local d="$STATE/rmqtt" n grpc="" raft="" plains=() tlss=()
  RMQTT_NODES=${SEALED_OTA_RMQTT_NODES:-3}
  [[ "$RMQTT_NODES" =~ ^[1-9]$ ]] || die "SEALED_OTA_RMQTT_NODES: 1 to 9 rmqtt nodes, not '$RMQTT_NODES'"
  mkdir -p "$d"
  echo "$RMQTT_PROFILE" >"$d/profile"
  : >"$d/ports"
  local ports
  mapfile -t ports < <(free_port $((5 * RMQTT_NODES)))
  ((${#ports[@]} == 5 * RMQTT_NODES)) || die "no $((5 * RMQTT_NODES)) free ports for the rmqtt nodes"
  for n in $(seq 1 $RMQTT_NODES); do
    echo "$n ${ports[*]:$((5 * (n - 1))):5}" >>"$d/ports"
  done
  for n in $(seq 1 $RMQTT_NODES); do
    grpc+="${grpc:+, }\"$n@127.0.0.1:$(rmqtt_port "$n" 4)\""
    raft+="${raft:+, }\"$n@127.0.0.1:$(rmqtt_port "$n" 5)\""
    plains+=("$(rmqtt_port "$n" 2)"); tlss+=("$(rmqtt_port "$n" 3)")
  done
  write_urls "${plains[@]}" -- "${tlss[@]}"
  for n in $(seq 1 $RMQTT_NODES); do
    local nd="$d/node$n" f
    mkdir -p "$nd/plugins"
    for f in rmqtt.toml plugins/rmqtt-cluster-raft.toml plugins/rmqtt-retainer.toml \
      plugins/rmqtt-shared-subscription.toml plugins/rmqtt-http-api.toml plugins/rmqtt-acl.toml; do
      sed -e "s|@VERSION@|$RMQTT_VERSION|g" -e "s|@NODE@|$n|g" -e "s|@DIR@|$nd|g" -e "s|@PKI@|$STATE/pki|g" \
        -e "s|@MQTT_PORT@|$(rmqtt_port "$n" 2)|g" -e "s|@MQTTS_PORT@|$(rmqtt_port "$n" 3)|g" \
        -e "s|@RPC_PORT@|$(rmqtt_port "$n" 4)|g" -e "s|@HTTP_PORT@|$(rmqtt_port "$n" 6)|g" \
        -e "s|@GRPC_ADDRS@|$grpc|g" -e "s|@RAFT_ADDRS@|$raft|g" \
        -e "s|@MAX_INFLIGHT@|${SEALED_OTA_RMQTT_MAX_INFLIGHT:-16}|g" \
        -e "s|@MAX_MQUEUE_LEN@|${SEALED_OTA_RMQTT_MAX_MQUEUE_LEN:-1000}|g" \
        -e "s|@LOG_LEVEL@|${SEALED_OTA_RMQTT_LOG_LEVEL:-info}|g" \
        "$REPO/e2e/brokers/rmqtt/$f.in" >"$nd/$f"
    done
  done
  # Node 1 first: it is the designated first Raft leader; the others join it.
  rmqtt_start_node 1
  wait_listening "$(rmqtt_port 1 3)" "$STATE/rmqtt-1.pid" "$d/node1.log" "rmqtt node 1"
  for n in $(seq 2 $RMQTT_NODES); do rmqtt_start_node "$n"; done
}

# rmqtt_start_node N: start (or restart) node N on its ports. A Raft port still in TIME-WAIT after
# a graceful stop refuses the bind ("Address already in use"), so wait until it binds again.
rmqtt_start_node() {
  local n=$1 d="$STATE/rmqtt" raft deadline=$((SECONDS + 120))
  raft=$(rmqtt_port "$n" 5)
  until python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',$raft))" 2>/dev/null; do
    ((SECONDS < deadline)) || die "rmqtt node $n: Raft port $raft still busy after 120s"
    sleep 1
  done
  (cd "$d/node$n" && { ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"; }; exec nohup "$(rmqtt_bin)" -f "$d/node$n/rmqtt.toml" >>"$d/node$n.log" 2>&1) &
  echo $! >"$STATE/rmqtt-$n.pid"
}

rmqtt_wait_node() {
  local n=$1
  wait_listening "$(rmqtt_port "$n" 3)" "$STATE/rmqtt-$n.pid" "$STATE/rmqtt/node$n.log" "rmqtt node $n"
  wait_listening "$(rmqtt_port "$n" 2)" "$STATE/rmqtt-$n.pid" "$STATE/rmqtt/node$n.log" "rmqtt node $n"
}

# The cluster serves when every node listens and node 1's HTTP API lists every node as running.
rmqtt_cluster_wait() {
  local n deadline=$((SECONDS + 90)) nodes
  for n in $(seq 1 $RMQTT_NODES); do rmqtt_wait_node "$n"; done
  until nodes=$(curl -sf --max-time 3 "http://127.0.0.1:$(rmqtt_port 1 6)/api/v1/nodes") &&
    [[ $(grep -o '"running":true' <<<"$nodes" | wc -l) -ge $RMQTT_NODES ]]; do
    ((SECONDS < deadline)) || die "rmqtt cluster: not every node running after 90s: ${nodes:-no answer} (logs: $STATE/rmqtt/node*.log)"
    sleep 0.5
  done
}

# e2e/testbed node kill|stop|start N (rmqtt-cluster only): what the broker-node-loss tests do.
rmqtt_node_cmd() {
  local verb=$1 n=$2 pidfile
  if ! [[ "$n" =~ ^[1-9]$ ]] || ((n > RMQTT_NODES)); then die "node: N must be 1..$RMQTT_NODES, got '$n'"; fi
  pidfile="$STATE/rmqtt-$n.pid"
  case "$verb" in
    kill) [[ -f "$pidfile" ]] && kill -9 "$(cat "$pidfile")" 2>/dev/null; rm -f "$pidfile"; log "rmqtt node $n killed" ;;
    stop) stop_pid "$pidfile"; log "rmqtt node $n stopped" ;;
    start)
      pid_alive "$pidfile" && { log "rmqtt node $n already runs"; return; }
      rmqtt_start_node "$n"; rmqtt_wait_node "$n"; log "rmqtt node $n started" ;;
    *) die "usage: e2e/testbed node kill|stop|start N" ;;
  esac
}

# broker_port mqtt|mqtts N: the port of node N's plain or TLS listener.
broker_port() { sed -n "${2}p" "$STATE/$1.urls" | sed 's|.*:||'; }

# broker_do KIND STEP: run <kind>_<step> (rmqtt-cluster's functions are rmqtt_cluster_*).
broker_do() { "${1//-/_}_$2"; }
