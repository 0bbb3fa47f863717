# scripts/lib.sh: shell helpers shared by scripts/images.sh and e2e/kind/node-image.sh (sourced,
# not run): root commands, Debian packages, and the input hashes that let a build step be skipped.
# The caller defines log, die, docker (its client) and LABEL (the image label holding the hash).
# shellcheck shell=bash

sudo_() { if [[ "$(id -u)" == 0 ]]; then "$@"; else sudo "$@"; fi; }

# Installs Debian packages that are missing, updating the package lists once if apt-get needs it.
apt_install() { # packages...
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  log "installing Debian packages: ${missing[*]}"
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
    { sudo_ apt-get update -q >/dev/null && sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; } ||
    die "apt-get install ${missing[*]} failed"
}

# Downloads a Debian package once into a cache directory (the machine's Debian release) and prints
# the .deb's path.
deb_file() { # cache-dir package
  local dir=$1 p=$2 deb
  mkdir -p "$dir"
  deb=$(find "$dir" -maxdepth 1 -name "${p}_*.deb" | head -n1)
  if [[ -z "$deb" ]]; then
    (cd "$dir" && { apt-get download "$p" >/dev/null 2>&1 ||
      { sudo_ apt-get update -q >/dev/null && apt-get download "$p" >/dev/null; }; }) || die "apt-get download $p failed"
    deb=$(find "$dir" -maxdepth 1 -name "${p}_*.deb" | head -n1)
  fi
  echo "$deb"
}

# A short hash of a build step's inputs: the files given (the calling script among them).
inputs_hash() { cat "$@" | sha256sum | cut -c1-16; }

# The input hash an image was built from ("" when there is no such image).
image_label() { docker image inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || true; }
