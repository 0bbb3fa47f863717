# scripts/lib.sh: shell helpers shared by the project's scripts (images, node image, test bed,
# kind, test dependencies; sourced, not run): processes by pid file, root commands, Debian
# packages, and the input hashes that let a build step be skipped. The caller defines log and die; the image helpers also docker (its client)
# and LABEL (the image label holding the hash).
# shellcheck shell=bash

sudo_() { if [[ "$(id -u)" == 0 ]]; then "$@"; else sudo "$@"; fi; }

# N distinct free loopback TCP ports (default 1), one a line, below the ephemeral range (see
# scripts/free-ports). Needs REPO.
free_port() { "$REPO/scripts/free-ports" "$@"; }

# Whether the process whose pid a file holds runs.
pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Stops the process whose pid a file holds (TERM, then KILL after 5 s) and removes the file.
stop_pid() { # pidfile
  local f=$1 pid
  [[ -f "$f" ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

# wait_lock FD WHAT: flock FD, and say so first when another process holds it (`make test` builds
# the test beds' servers in the background while it compiles: a step that needs one waits here).
wait_lock() { # fd what
  flock -n "$1" && return 0
  log "waiting for $2 in another process (make test's background build logs to target/prebuild/log)"
  flock "$1"
}

# Installs Debian packages that are missing, updating the package lists once if apt-get needs it,
# and waiting up to 10 minutes for another apt-get to finish (make test's background build may
# install one at the same time). APT_INSTALL_OPTS (an array, optional) adds apt-get options.
apt_install() { # packages...
  local missing=() p opts=(-y -q -o DPkg::Lock::Timeout=600 "${APT_INSTALL_OPTS[@]}")
  for p in "$@"; do [[ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" == installed ]] || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"
  log "installing Debian packages: ${missing[*]}"
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "${missing[@]}" >/dev/null 2>&1 ||
    { sudo_ apt-get update -q >/dev/null && sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "${missing[@]}" >/dev/null; } ||
    die "apt-get install ${missing[*]} failed"
}

# apt_install for packages that ship daemons the tests start themselves (on free ports, stopped by
# pid): without recommends, keeping changed configuration files, with the maintainer scripts told
# not to start anything (policy-rc.d exit 101 = "action forbidden", placed only when none exists and
# removed afterwards) and the units the packages enabled disabled again, so a booted machine does
# not run a system daemon next to the tests' own.
apt_install_dormant() { # "units to disable" packages...
  local units=$1 placed=0 rc=0 unit
  shift
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | sudo_ tee /usr/sbin/policy-rc.d >/dev/null
    sudo_ chmod 0755 /usr/sbin/policy-rc.d
    placed=1
  fi
  (APT_INSTALL_OPTS=(--no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    apt_install "$@") || rc=$?
  if [[ "$placed" == 1 ]]; then sudo_ rm -f /usr/sbin/policy-rc.d; fi
  ((rc == 0)) || exit "$rc"
  for unit in $units; do
    if [[ -e "/lib/systemd/system/$unit" || -e "/usr/lib/systemd/system/$unit" ]]; then
      sudo_ systemctl disable --no-reload "$unit" >/dev/null 2>&1 || true
    fi
  done
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
