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
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

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
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"

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

apt_install_dormant "${SERVICES[*]}" "${missing[@]}"

mapfile -t still < <(missing_packages)
[[ ${#still[@]} -eq 0 ]] || die "still missing after apt-get: ${still[*]}"
log "done"
