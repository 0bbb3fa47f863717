#!/usr/bin/env bash
# scripts/install-prometheus.sh: install Debian's Prometheus server (the metrics gates of
# UpdateCampaigns are tested against it), non-interactively, without starting or enabling the
# service the package ships: the tests start their own on a free loopback port and stop it by pid.
# Idempotent: when it is there it only checks. Prints the path of the prometheus binary. Needs root
# or sudo and Debian's apt.
#
#   scripts/install-prometheus.sh          install it if missing, print its path
#   scripts/install-prometheus.sh --check  exit 1 (and say so) when it is missing
set -euo pipefail

log() { echo "install-prometheus: $*" >&2; }
die() { echo "install-prometheus: error: $*" >&2; exit 1; }

found() { command -v prometheus 2>/dev/null || { [[ -x /usr/bin/prometheus ]] && echo /usr/bin/prometheus; }; }

if bin=$(found); then echo "$bin"; exit 0; fi
[[ "${1:-}" == "--check" ]] && die "Prometheus is not installed (run scripts/install-prometheus.sh)"

sudo=""
if [[ "$(id -u)" != 0 ]]; then
  command -v sudo >/dev/null || die "root or sudo is needed to install prometheus"
  sudo="sudo"
fi
command -v apt-get >/dev/null || die "apt-get not found: install Prometheus by hand"

# Keep the maintainer scripts from starting the service: invoke-rc.d asks policy-rc.d first, and
# 101 means "action forbidden". Only placed when none exists, and removed again afterwards.
placed=0
cleanup() { if [[ "$placed" == 1 ]]; then $sudo rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod 0755 /usr/sbin/policy-rc.d
  placed=1
fi

log "installing prometheus"
apt_install() {
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold prometheus >/dev/null
}
apt_install || { $sudo apt-get update -q >/dev/null && apt_install; } ||
  die "apt-get could not install prometheus"
if [[ -e /lib/systemd/system/prometheus.service || -e /usr/lib/systemd/system/prometheus.service ]]; then
  $sudo systemctl disable --no-reload prometheus.service >/dev/null 2>&1 || true
fi
bin=$(found) || die "prometheus still missing after apt-get"
log "done: $bin"
echo "$bin"
