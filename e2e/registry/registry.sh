# shellcheck shell=bash
# e2e/registry/registry.sh: the test bed's OCI registry (sourced by e2e/testbed). The CNCF
# `distribution` registry and the `oras` client, each built once from its pinned Go module into
# ~/.cache/sealed-ota (flock-protected), the registry started on a free loopback port with
# htpasswd basic auth (user and password generated per test bed), stopped by pid. Plain HTTP on
# loopback: campaigns reach it with spec.payload.firmware.oci.insecure, oras with --plain-http.
# Needs: $STATE, $REPO, log, die, free_port from the caller (e2e/testbed, e2e/kind/kind.sh), and
# pid_alive, stop_pid, wait_lock and apt_install from scripts/lib.sh.

REGISTRY_MODULE=github.com/distribution/distribution/v3/cmd/registry
REGISTRY_VERSION=v3.0.0
ORAS_MODULE=oras.land/oras/cmd/oras
ORAS_VERSION=v1.3.6
TOOLS_CACHE="${SEALED_OTA_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sealed-ota}"
REGISTRY_BIN="$TOOLS_CACHE/distribution-${REGISTRY_VERSION#v}/registry"
ORAS_BIN="$TOOLS_CACHE/oras-${ORAS_VERSION#v}/oras"

# go_tool BIN MODULE VERSION: build MODULE@VERSION into BIN's directory once.
go_tool() {
  local bin=$1 module=$2 version=$3 dir
  dir=$(dirname "$bin")
  mkdir -p "$dir"
  exec 8>"$dir/.build.lock"
  wait_lock 8 "the build of $module"
  if [[ ! -x "$bin" ]]; then
    command -v go >/dev/null || die "go is not installed; it is needed once to build $module"
    log "building $module@$version from its Go module (first run only)"
    rm -rf "$dir/tmp" && mkdir -p "$dir/tmp"
    GOBIN="$dir/tmp" GOFLAGS=-trimpath go install -ldflags='-s -w' "$module@$version"
    mv "$dir/tmp/$(basename "$bin")" "$bin"
    rm -rf "$dir/tmp"
  fi
  exec 8>&-
}

registry_install() {
  go_tool "$REGISTRY_BIN" "$REGISTRY_MODULE" "$REGISTRY_VERSION"
  go_tool "$ORAS_BIN" "$ORAS_MODULE" "$ORAS_VERSION"
  if ! command -v htpasswd >/dev/null; then
    apt_install apache2-utils # htpasswd, for the registry's basic auth
  fi
}

registry_start() {
  local d="$STATE/registry" port
  mkdir -p "$d/data"
  port=$(free_port)
  echo "127.0.0.1:$port" >"$STATE/registry.addr"
  echo fleet >"$d/user"
  openssl rand -hex 16 >"$d/password"
  htpasswd -nbB fleet "$(cat "$d/password")" >"$d/htpasswd" 2>/dev/null
  cat >"$d/config.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $d/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
auth:
  htpasswd:
    realm: sealed-ota-testbed
    path: $d/htpasswd
YAML
  nohup "$REGISTRY_BIN" serve "$d/config.yml" >"$STATE/registry.log" 2>&1 &
  echo $! >"$STATE/registry.pid"
}

registry_wait() {
  local deadline=$((SECONDS + 30)) addr
  addr=$(cat "$STATE/registry.addr")
  # /v2/ answers 401 once the registry listens (auth is required).
  until [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$addr/v2/")" == 401 ]]; do
    pid_alive "$STATE/registry.pid" || { tail -20 "$STATE/registry.log" >&2; die "the registry exited (log: $STATE/registry.log)"; }
    ((SECONDS < deadline)) || die "the registry is not answering after 30 s (log: $STATE/registry.log)"
    sleep 0.2
  done
}

registry_env() {
  [[ -f "$STATE/registry.addr" ]] || return 0
  cat <<ENV
export SEALED_OTA_REGISTRY='$(cat "$STATE/registry.addr")'
export SEALED_OTA_REGISTRY_USER='$(cat "$STATE/registry/user")'
export SEALED_OTA_REGISTRY_PASSWORD='$(cat "$STATE/registry/password")'
export SEALED_OTA_ORAS='$ORAS_BIN'
ENV
}

# Stops the registry by pid and removes what registry_start made (data, credentials, address).
registry_stop() {
  stop_pid "$STATE/registry.pid"
  rm -rf "$STATE/registry" "$STATE/registry.addr" "$STATE/registry.log"
}
