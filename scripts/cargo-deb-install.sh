#!/usr/bin/env bash
# scripts/cargo-deb-install.sh: put a pinned `cargo-deb` in ~/.cache/sealed-ota/tools (outside the
# clone) and print its path. Built once from crates.io with `cargo install --locked`; later runs only
# print the path. Concurrent first runs are serialised with flock.
#
#   scripts/cargo-deb-install.sh              install if needed, print the cargo-deb path
#   CARGO_DEB=$(scripts/cargo-deb-install.sh)  use it: "$CARGO_DEB" deb -p sealed-ota-agent
set -euo pipefail

VERSION="${SEALED_OTA_CARGO_DEB_VERSION:-3.8.0}"
CACHE="${SEALED_OTA_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sealed-ota/tools}"
ROOT="$CACHE/cargo-deb-$VERSION"
BIN="$ROOT/bin/cargo-deb"

log() { echo "cargo-deb-install: $*" >&2; }
die() { echo "cargo-deb-install: error: $*" >&2; exit 1; }
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ -x "$BIN" ]]; then echo "$BIN"; exit 0; fi
command -v cargo >/dev/null || die "cargo is needed to build cargo-deb"
mkdir -p "$CACHE"
exec 9>"$CACHE/.cargo-deb.lock"
wait_lock 9 "the build of cargo-deb $VERSION"
if [[ -x "$BIN" ]]; then echo "$BIN"; exit 0; fi

log "building cargo-deb $VERSION with cargo install (first run only, a few minutes)"
# Its own target dir, so the project's target/ and build flags stay out of it.
work="$(mktemp -d "$CACHE/tmp.XXXXXX")"
trap 'rm -rf "$work"' EXIT
CARGO_TARGET_DIR="$work/target" cargo install --quiet --locked --version "$VERSION" \
  --root "$work/root" cargo-deb >&2 || die "cargo install cargo-deb@$VERSION failed"
mkdir -p "$ROOT"
rm -rf "${ROOT:?}/bin"
mv "$work/root/bin" "$ROOT/bin"
"$BIN" --version >&2
echo "$BIN"
