#!/usr/bin/env bash
# scripts/images.sh: the container images of Sealed OTA, built on this machine without a registry.
#
#   scripts/images.sh build [--profile release|debug] [--tag TAG]
#       operator and device-emulator images: the binaries built here with cargo (--locked), then the
#       final stage of docker/<name>.Dockerfile on sealed-ota/runtime-base (BINARY=prebuilt)
#   scripts/images.sh mosquitto [--tag TAG]
#       sealed-ota/mosquitto: Debian's mosquitto and the libraries it links, nothing else
#   scripts/images.sh dockerfile [--profile release|debug] [--tag TAG]
#       the Dockerfiles exactly as a user with a registry runs them (compile stage included), with
#       local stand-ins for their two base images (see `bases`)
#   scripts/images.sh bases
#       sealed-ota/runtime-base:bookworm, the stand-in for gcr.io/distroless/cc-debian12:nonroot:
#         glibc, libgcc, CA bundle, tzdata, /etc/passwd with nonroot (65532); no shell, no apt, no dpkg
#       sealed-ota/rust-builder:<rustc>-bookworm, the stand-in for docker.io/library/rust:<v>-slim-bookworm:
#         a Debian root filesystem from debootstrap (gcc, libc6-dev) and this machine's Rust toolchain
#
# Every image is made from Debian's packages (apt-get download / debootstrap), from what cargo
# builds here, or both; nothing is pulled. Downloads and root filesystems are cached in
# ~/.cache/sealed-ota/images (SEALED_OTA_CACHE), images in Docker's store; an image whose inputs did
# not change (label dev.sealed-ota.inputs) is not rebuilt. Needs a Docker daemon (scripts/docker.sh
# up) whose client builds with BuildKit.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUITE=bookworm
MIRROR="${SEALED_OTA_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE="${SEALED_OTA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sealed-ota}/images"
RUNTIME_BASE="sealed-ota/runtime-base:$SUITE"
LABEL=dev.sealed-ota.inputs
NONROOT=65532
MOSQUITTO_UID=1883
# Packages of distroless' cc-debian12 that a Rust binary linked against glibc needs at run time.
RUNTIME_PACKAGES=(base-files netbase tzdata libc6 libgcc-s1)
# The two product images: name, package, binary.
PRODUCTS=("operator sealed-ota-operator sealed-ota-operator" "device-emulator sealed-ota-device-emulator sealed-ota-device-emulator")

log() { echo "images: $*" >&2; }
die() { echo "images: error: $*" >&2; exit 1; }

DOCKER="$("$REPO/scripts/docker.sh" cli)" || die "no docker client (scripts/docker.sh up first)"
docker() { "$DOCKER" "$@"; }
# Debian's 20.10 client builds with BuildKit only when asked; newer clients ignore the variable.
export DOCKER_BUILDKIT=1

# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"
SELF="${BASH_SOURCE[0]}"

lock() { mkdir -p "$CACHE"; exec 7>"$CACHE/.lock"; flock 7; }

# --- Debian packages -----------------------------------------------------------------------------
# Unpacks packages into a root filesystem without running their scripts (as distroless does), and
# records them in /var/lib/dpkg/status.d so image scanners see what is inside.
unpack() { # rootfs packages...
  local root=$1 p deb; shift
  mkdir -p "$root/var/lib/dpkg/status.d"
  for p in "$@"; do
    deb=$(deb_file "$CACHE/debs" "$p")
    dpkg-deb -x "$deb" "$root"
    dpkg-deb -f "$deb" >"$root/var/lib/dpkg/status.d/$p"
  done
}

# The shared libraries a package needs, transitively: the first alternative of each Depends and
# Pre-Depends, followed through library packages only, so maintainer-script tooling (adduser,
# debconf, perl) and what it depends on stay out.
library_closure() { # package
  local -A seen=()
  local queue=("$1") p d
  while ((${#queue[@]})); do
    p=${queue[0]}; queue=("${queue[@]:1}")
    while read -r d; do
      [[ "$d" =~ ^lib[a-z0-9.+-]+$ && "$d" != libc-bin && -z "${seen[$d]:-}" ]] || continue
      seen[$d]=1
      queue+=("$d")
    done < <(apt-cache depends "$p" 2>/dev/null | sed -nE 's/^  \|?(Pre)?Depends: ([^ <>]+)$/\2/p')
  done
  printf '%s\n' "${!seen[@]}" | sort
}

# Removes what a runtime image does not need (documentation, maintainer tooling).
prune() { # rootfs
  rm -rf "$1/usr/share/doc" "$1/usr/share/man" "$1/usr/share/info" "$1/usr/share/lintian" "$1/usr/share/locale"
}

passwd_files() { # rootfs [extra passwd line] [extra group line]
  local root=$1
  mkdir -p "$root/etc" "$root/home/nonroot" "$root/root" "$root/tmp"
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/root"
  chown "$NONROOT:$NONROOT" "$root/home/nonroot"
  {
    echo "root:x:0:0:root:/root:/sbin/nologin"
    echo "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin"
    echo "nonroot:x:$NONROOT:$NONROOT:nonroot:/home/nonroot:/sbin/nologin"
    [[ -z "${2:-}" ]] || echo "$2"
  } >"$root/etc/passwd"
  {
    echo "root:x:0:"
    echo "nogroup:x:65534:"
    echo "nonroot:x:$NONROOT:"
    [[ -z "${3:-}" ]] || echo "$3"
  } >"$root/etc/group"
}

# The CA bundle, as update-ca-certificates would write it, from the ca-certificates package.
ca_bundle() { # rootfs
  local root=$1 tmp
  tmp=$(mktemp -d)
  dpkg-deb -x "$(deb_file "$CACHE/debs" ca-certificates)" "$tmp"
  mkdir -p "$root/etc/ssl/certs"
  find "$tmp/usr/share/ca-certificates" -name '*.crt' | sort | xargs cat >"$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$tmp"
  [[ -s "$root/etc/ssl/certs/ca-certificates.crt" ]] || die "empty CA bundle"
}

import() { # rootfs ref label docker-import-change...
  local root=$1 ref=$2 label=$3 old; shift 3
  old=$(image_id "$ref")
  tar -C "$root" --numeric-owner -cf - . | docker import "$@" --change "LABEL $LABEL=$label" - "$ref" >/dev/null
  drop_replaced "$old" "$ref"
}

image_id() { docker image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }

# The image a rebuild moved a tag away from, unless something still uses it.
drop_replaced() { # old-id ref
  [[ -n "$1" && "$1" != "$(image_id "$2")" ]] || return 0
  docker rmi "$1" >/dev/null 2>&1 || true
}

# --- bases ---------------------------------------------------------------------------------------
build_runtime_base() {
  local want root
  want=$(inputs_hash "$SELF")
  [[ "$(image_label "$RUNTIME_BASE")" == "$want" ]] && return
  log "runtime base $RUNTIME_BASE from Debian packages: ${RUNTIME_PACKAGES[*]}"
  root=$(mktemp -d "$CACHE/runtime.XXXXXX")
  unpack "$root" "${RUNTIME_PACKAGES[@]}"
  ca_bundle "$root"
  passwd_files "$root"
  prune "$root"
  import "$root" "$RUNTIME_BASE" "$want" \
    --change "USER $NONROOT:$NONROOT" --change 'WORKDIR /home/nonroot' \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt'
  rm -rf "$root"
}

builder_image() { echo "sealed-ota/rust-builder:$(rustc --version | cut -d' ' -f2)-$SUITE"; }

build_builder() {
  local ref sysroot want rootfs="$CACHE/rootfs-builder-$SUITE" root
  command -v rustc >/dev/null || die "rustc is needed (its toolchain goes into the builder image)"
  ref=$(builder_image)
  sysroot=$(rustc --print sysroot)
  want=$(inputs_hash "$SELF" <(rustc -vV))
  [[ "$(image_label "$ref")" == "$want" ]] && return
  # make: jemalloc, the operator's allocator, builds with it.
  if [[ ! -x "$rootfs/usr/bin/gcc" || ! -x "$rootfs/usr/bin/make" ]]; then
    apt_install debootstrap
    log "debootstrap $SUITE (gcc, libc6-dev, make) for $ref (first run only)"
    sudo_ rm -rf "$rootfs" "$rootfs.tmp"
    sudo_ debootstrap --variant=minbase --include=gcc,libc6-dev,make,ca-certificates "$SUITE" "$rootfs.tmp" "$MIRROR" \
      >"$CACHE/debootstrap-builder.log" 2>&1 || { tail -n 20 "$CACHE/debootstrap-builder.log" >&2; die "debootstrap failed"; }
    rm -rf "$rootfs.tmp"/var/cache/apt/archives/*.deb "$rootfs.tmp"/var/lib/apt/lists/*
    mv "$rootfs.tmp" "$rootfs"
  fi
  log "builder $ref: Debian + the Rust toolchain at $sysroot"
  root=$(mktemp -d "$CACHE/builder.XXXXXX")
  cp -a "$rootfs/." "$root/"
  mkdir -p "$root/usr/local/rust/bin" "$root/usr/local/cargo"
  cp -a "$sysroot/bin/cargo" "$sysroot/bin/rustc" "$sysroot/bin/rustdoc" "$root/usr/local/rust/bin/"
  # The compiler's libraries and the standard library for this target; not rust-src or docs.
  tar -C "$sysroot" --exclude='lib/rustlib/src' --exclude='lib/rustlib/rustc-src' -cf - lib | tar -C "$root/usr/local/rust" -xf -
  # cargo in the builder reaches crates.io the way cargo on this machine does: through the same
  # trust store (a TLS-intercepting proxy's CA included, where the machine has one).
  if [[ -s /etc/ssl/certs/ca-certificates.crt ]]; then
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  fi
  import "$root" "$ref" "$want" \
    --change 'ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'WORKDIR /'
  rm -rf "$root"
}

# --- product images ------------------------------------------------------------------------------
parse_opts() {
  PROFILE=release
  TAG=dev
  while (($#)); do
    case "$1" in
      --profile) PROFILE=${2:?}; shift 2 ;;
      --tag) TAG=${2:?}; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  [[ "$PROFILE" == release || "$PROFILE" == debug ]] || die "--profile: release or debug, not $PROFILE"
}

# The offline path: cargo builds the binaries here; the Dockerfile's final stage puts each on the
# runtime base (its compile stage is skipped: BINARY=prebuilt takes the binary from the context).
cmd_build() {
  parse_opts "$@"
  lock
  build_runtime_base
  # The whole workspace's binaries, as `make e2e` and the bench harness build them: the same
  # feature set, so their builds and this one share every artifact.
  local cargo_args=(build --locked --workspace --bins) dir entry name package bin
  [[ "$PROFILE" == release ]] && cargo_args+=(--release)
  log "cargo ${cargo_args[*]}"
  (cd "$REPO" && cargo "${cargo_args[@]}")
  dir="${CARGO_TARGET_DIR:-$REPO/target}/$PROFILE"
  for entry in "${PRODUCTS[@]}"; do
    read -r name package bin <<<"$entry"
    local ctx old
    ctx=$(mktemp -d "$CACHE/context.XXXXXX")
    cp "$dir/$bin" "$ctx/$bin"
    log "sealed-ota/$package:$TAG (offline: $PROFILE binary on $RUNTIME_BASE)"
    old=$(image_id "sealed-ota/$package:$TAG")
    docker build -q -f "$REPO/docker/$name.Dockerfile" --build-arg BINARY=prebuilt \
      --build-arg "RUNTIME_IMAGE=$RUNTIME_BASE" -t "sealed-ota/$package:$TAG" "$ctx" >/dev/null
    drop_replaced "$old" "sealed-ota/$package:$TAG"
    rm -rf "$ctx"
  done
}

# cargo's name of the profile --profile picks.
cargo_profile() { if [[ "$PROFILE" == debug ]]; then echo dev; else echo release; fi; }

# The registry path: the Dockerfiles as they are, compile stage included, against local stand-ins
# for docker.io/library/rust and gcr.io/distroless/cc (nothing else differs).
cmd_dockerfile() {
  parse_opts "$@"
  lock
  build_runtime_base
  build_builder
  local entry name package bin old
  for entry in "${PRODUCTS[@]}"; do
    read -r name package bin <<<"$entry"
    log "sealed-ota/$package:$TAG (docker/$name.Dockerfile, $PROFILE build in $(builder_image))"
    old=$(image_id "sealed-ota/$package:$TAG")
    docker build -f "$REPO/docker/$name.Dockerfile" --build-arg "BUILDER_IMAGE=$(builder_image)" \
      --build-arg "RUNTIME_IMAGE=$RUNTIME_BASE" --build-arg "CARGO_PROFILE=$(cargo_profile)" \
      -t "sealed-ota/$package:$TAG" "$REPO" >&2
    drop_replaced "$old" "sealed-ota/$package:$TAG"
  done
}

cmd_mosquitto() {
  parse_opts "$@"
  lock
  local ref="sealed-ota/mosquitto:$TAG" want root libs
  mapfile -t libs < <(library_closure mosquitto)
  if ((${#libs[@]} == 0)); then # a fresh machine's empty package lists
    sudo_ apt-get update -q >/dev/null
    mapfile -t libs < <(library_closure mosquitto)
  fi
  ((${#libs[@]})) || die "apt-cache knows no dependencies of mosquitto"
  want=$(inputs_hash "$SELF" <(printf '%s\n' "${libs[@]}"))
  [[ "$(image_label "$ref")" == "$want" ]] && return
  log "$ref from Debian packages: mosquitto ${libs[*]}"
  root=$(mktemp -d "$CACHE/mosquitto.XXXXXX")
  unpack "$root" base-files netbase mosquitto "${libs[@]}"
  ca_bundle "$root"
  passwd_files "$root" "mosquitto:x:$MOSQUITTO_UID:$MOSQUITTO_UID:mosquitto:/mosquitto:/sbin/nologin" "mosquitto:x:$MOSQUITTO_UID:"
  # Maintainer-script leftovers that are not part of the broker (init scripts, the systemd unit).
  rm -rf "$root/etc/init.d" "$root/lib/systemd" "$root/usr/lib/systemd" "$root/etc/logrotate.d"
  mkdir -p "$root/mosquitto/config" "$root/mosquitto/data"
  chown -R "$MOSQUITTO_UID:$MOSQUITTO_UID" "$root/mosquitto"
  cp "$root/etc/mosquitto/mosquitto.conf" "$root/mosquitto/config/mosquitto.conf"
  prune "$root"
  import "$root" "$ref" "$want" \
    --change "USER $MOSQUITTO_UID:$MOSQUITTO_UID" --change 'WORKDIR /mosquitto' \
    --change 'ENV PATH=/usr/sbin:/usr/bin' \
    --change 'ENTRYPOINT ["/usr/sbin/mosquitto"]' --change 'CMD ["-c", "/mosquitto/config/mosquitto.conf"]'
  rm -rf "$root"
}

case "${1:-}" in
  build) shift; cmd_build "$@" ;;
  dockerfile) shift; cmd_dockerfile "$@" ;;
  mosquitto) shift; cmd_mosquitto "$@" ;;
  bases) lock; build_runtime_base; build_builder ;;
  runtime-base) lock; build_runtime_base; echo "$RUNTIME_BASE" ;;
  *) echo "usage: scripts/images.sh build|dockerfile|mosquitto|bases [--profile release|debug] [--tag TAG]" >&2; exit 2 ;;
esac
