#!/usr/bin/env bash
# scripts/install-agent-test-deps.sh: install the Debian packages the agent's tests drive for real
# (RAUC and its D-Bus service, squashfs-tools for `rauc bundle`, the Mender client's update modules
# and mender-artifact, a D-Bus daemon, systemd-analyze for the unit check), non-interactively,
# without starting or enabling any of the services those packages ship. Idempotent: when
# everything is there it only checks. Needs root or sudo and Debian's apt.
#
#   scripts/install-agent-test-deps.sh          install what is missing
#   scripts/install-agent-test-deps.sh --check  exit 1 (and say what is missing) without installing
set -euo pipefail

# command -> package that provides it
declare -A NEEDS=(
  [rauc]=rauc
  [/usr/share/dbus-1/interfaces/de.pengutronix.rauc.Installer.xml]=rauc-service
  [mksquashfs]=squashfs-tools
  [unsquashfs]=squashfs-tools
  [dbus-daemon]=dbus-daemon
  [busctl]=systemd
  [systemd-analyze]=systemd
  [mender-artifact]=mender-artifact
  [/usr/share/mender/modules/v3/single-file]=mender-client
  [openssl]=openssl
)
# Services the packages enable or start; none may run here: the tests start their own.
SERVICES=(rauc.service rauc-mark-good.service mender-client.service mender-authd.service mender-updated.service)

log() { echo "install-agent-test-deps: $*" >&2; }
die() { echo "install-agent-test-deps: error: $*" >&2; exit 1; }

missing_packages() {
  local cmd
  for cmd in "${!NEEDS[@]}"; do
    if [[ "$cmd" == /* ]]; then [[ -e "$cmd" ]] && continue
    else command -v "$cmd" >/dev/null 2>&1 && continue; [[ -x "/usr/sbin/$cmd" || -x "/sbin/$cmd" ]] && continue
    fi
    echo "${NEEDS[$cmd]}"
  done | sort -u
}

mapfile -t missing < <(missing_packages)
if [[ ${#missing[@]} -eq 0 ]]; then exit 0; fi
if [[ "${1:-}" == "--check" ]]; then
  die "missing Debian packages: ${missing[*]} (run scripts/install-agent-test-deps.sh)"
fi

sudo=""
if [[ "$(id -u)" != 0 ]]; then
  command -v sudo >/dev/null || die "root or sudo is needed to install: ${missing[*]}"
  sudo="sudo"
fi
command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"

# Keep maintainer scripts from starting services: invoke-rc.d asks policy-rc.d first, and 101 means
# "action forbidden". Only placed when none exists, and removed again afterwards.
placed=0
cleanup() { if [[ "$placed" == 1 ]]; then $sudo rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod 0755 /usr/sbin/policy-rc.d
  placed=1
fi

log "installing ${missing[*]}"
apt_install() {
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" >/dev/null
}
apt_install "${missing[@]}" ||
  { $sudo apt-get update -q >/dev/null && apt_install "${missing[@]}"; } ||
  die "apt-get could not install: ${missing[*]}"

# Packages enable their units at install time (deb-systemd-helper); disable them so a booted
# machine does not start a system RAUC or Mender daemon next to the tests' own.
for unit in "${SERVICES[@]}"; do
  if [[ -e "/lib/systemd/system/$unit" || -e "/usr/lib/systemd/system/$unit" ]]; then
    $sudo systemctl disable --no-reload "$unit" >/dev/null 2>&1 || true
  fi
done

mapfile -t still < <(missing_packages)
[[ ${#still[@]} -eq 0 ]] || die "still missing after apt-get: ${still[*]}"
log "done"
