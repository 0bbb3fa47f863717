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
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { echo "install-prometheus: $*" >&2; }
die() { echo "install-prometheus: error: $*" >&2; exit 1; }
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"

found() { command -v prometheus 2>/dev/null || { [[ -x /usr/bin/prometheus ]] && echo /usr/bin/prometheus; }; }

if bin=$(found); then echo "$bin"; exit 0; fi
[[ "${1:-}" == "--check" ]] && die "Prometheus is not installed (run scripts/install-prometheus.sh)"

apt_install_dormant "prometheus.service" prometheus
bin=$(found) || die "prometheus still missing after apt-get"
log "done: $bin"
echo "$bin"
