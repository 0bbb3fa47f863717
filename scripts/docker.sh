#!/usr/bin/env bash
# scripts/docker.sh: a Docker engine for the image builds and the kind cluster.
#
#   scripts/docker.sh up STATE      a daemon that answers, else Debian's docker.io (installed with
#                                   apt-get when missing) started here, its pid in STATE/dockerd.pid
#   scripts/docker.sh down STATE    stop the dockerd that `up` started for STATE (by pid); a daemon
#                                   this script did not start is left alone
#   scripts/docker.sh cli           print the docker client to use (one that can build with BuildKit
#                                   against this daemon)
#   scripts/docker.sh privileged    exit 0 when `docker run --privileged` can work on this host
#
# A daemon started here keeps its images under ~/.cache/sealed-ota/docker (outside the clone), so a
# second run finds the images it built. It listens on Docker's default socket, so kind, kubectl and
# a user's own docker client find it without settings.
set -euo pipefail

CACHE="${SEALED_OTA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sealed-ota}"
DATA_ROOT="$CACHE/docker/data-root"
START_TIMEOUT="${SEALED_OTA_DOCKER_TIMEOUT:-60}"

log() { echo "docker.sh: $*" >&2; }
die() { echo "docker.sh: error: $*" >&2; exit 1; }

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# The client: Debian's (BuildKit built in) when that is the daemon we run; otherwise whatever
# `docker` is on PATH (a user's Docker Desktop or docker-ce with buildx).
cli() {
  if [[ -x /usr/bin/docker ]] && /usr/bin/docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
    echo /usr/bin/docker
  elif command -v docker >/dev/null; then
    command -v docker
  else
    return 1
  fi
}

answers() { local d; d=$(cli 2>/dev/null) && "$d" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

install_docker() {
  [[ -x /usr/sbin/dockerd ]] && return
  log "installing Debian's docker.io"
  local sudo="" placed=0
  [[ "$(id -u)" == 0 ]] || sudo="sudo"
  # The package's init script must not start a system daemon: this script starts its own.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    placed=1
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 docker.io >/dev/null 2>&1 ||
    { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 docker.io >/dev/null; } ||
    die "could not install docker.io with apt-get"
  if ((placed)); then $sudo rm -f /usr/sbin/policy-rc.d; fi
  [[ -x /usr/sbin/dockerd ]] || die "docker.io installed but /usr/sbin/dockerd is missing"
}

cmd_up() {
  local state=${1:?usage: scripts/docker.sh up STATE}
  mkdir -p "$state"
  if answers; then return; fi
  install_docker
  [[ "$(id -u)" == 0 ]] || die "no Docker daemon answers and starting one needs root (start Docker, or run as root)"
  mkdir -p "$DATA_ROOT"
  # dockerd leaves its default bridge behind when it stops: remember to remove it if it made it.
  ip link show docker0 >/dev/null 2>&1 || touch "$state/created-docker0"
  # dockerd bind-mounts its data root onto itself (to set mount propagation) and leaves that mount
  # behind when it stops: remember to unmount it if it was not a mount point before.
  mountpoint -q "$DATA_ROOT" || touch "$state/created-data-root-mount"
  log "starting dockerd (data root $DATA_ROOT)"
  # setsid: the daemon outlives the make target that started it until `down` stops it by pid.
  setsid /usr/sbin/dockerd --data-root "$DATA_ROOT" --pidfile "$state/dockerd.pidfile" \
    >"$state/dockerd.log" 2>&1 </dev/null &
  echo $! >"$state/dockerd.pid"
  local deadline=$((SECONDS + START_TIMEOUT))
  until answers; do
    pid_alive "$state/dockerd.pid" || { tail -n 20 "$state/dockerd.log" >&2; die "dockerd exited (log: $state/dockerd.log)"; }
    ((SECONDS < deadline)) || die "dockerd did not answer within ${START_TIMEOUT}s (log: $state/dockerd.log)"
    sleep 0.5
  done
}

cmd_down() {
  local state=${1:?usage: scripts/docker.sh down STATE} pid
  [[ -f "$state/dockerd.pid" ]] || return 0
  pid=$(cat "$state/dockerd.pid")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping dockerd (pid $pid)"
    kill "$pid"
    # dockerd stops its containers and its containerd first; give it the time that takes.
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "dockerd (pid $pid) did not stop in 30 s: killing it"
      kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$state/dockerd.pid" "$state/dockerd.pidfile"
  # It also leaves the mounts of its network namespaces (netns/default, the host's) behind.
  local ns
  for ns in /run/docker/netns/*; do
    if mountpoint -q "$ns"; then umount "$ns" || true; fi
  done
  if [[ -f "$state/created-docker0" ]]; then
    ip link delete docker0 2>/dev/null || true
    rm -f "$state/created-docker0"
  fi
  if [[ -f "$state/created-data-root-mount" ]]; then
    while mountpoint -q "$DATA_ROOT"; do umount "$DATA_ROOT" || break; done
    rm -f "$state/created-data-root-mount"
  fi
}

# Whether this host lets containers run --privileged: Docker gives a privileged container every
# capability the kernel knows and fails ("unable to apply caps") when the caller's bounding set
# lacks one. Some sandboxes keep CAP_SYS_RESOURCE out; kind then runs through e2e/kind/shim.
cmd_privileged() {
  local bound last
  bound=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
  last=$(cat /proc/sys/kernel/cap_last_cap)
  (( (16#$bound & ((1 << (last + 1)) - 1)) == ((1 << (last + 1)) - 1) ))
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  cli) cli || die "no docker client installed" ;;
  privileged) cmd_privileged ;;
  *) echo "usage: scripts/docker.sh up STATE|down STATE|cli|privileged" >&2; exit 2 ;;
esac
