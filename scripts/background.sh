#!/usr/bin/env bash
# scripts/background.sh: one command run in the background at the lowest CPU priority, tracked by
# pid. `make test` builds the test beds' servers and tools this way (Go control plane, registry,
# cargo-deb, rmqttd: cached outside the clone, so only a cold run has work to do) while the
# foreground compiles and tests: the build takes the cycles the foreground leaves idle, and a step
# that needs a server before it is built waits on that server's build lock (scripts/lib.sh
# wait_lock) instead of building it a second time.
#
#   scripts/background.sh start DIR -- COMMAND...   run COMMAND at nice 19 in a process group of its
#                                                   own; output in DIR/log, exit status in DIR/rc
#   scripts/background.sh stop DIR                  stop it (its whole group) if it still runs, and
#                                                   say how it ended
#
# Not setsid: with the kernel's autogroup scheduling a new session is a new scheduling group, which
# would get an equal share of the CPU whatever its nice value.
set -euo pipefail

log() { echo "background: $*" >&2; }
die() { echo "background: error: $*" >&2; exit 1; }

cmd_start() {
  local dir=${1:?usage: scripts/background.sh start DIR -- COMMAND...}
  shift
  [[ "${1:-}" == -- ]] || die "start: '--' before the command"
  shift
  (($#)) || die "start: no command"
  cmd_stop "$dir" quiet
  mkdir -p "$dir"
  rm -f "$dir/rc"
  set -m # the job gets a process group of its own, so stop reaches every process it started
  # shellcheck disable=SC2016
  nice -n 19 bash -c '"$@"; echo $? >"$0/rc"' "$dir" "$@" </dev/null >"$dir/log" 2>&1 &
  echo $! >"$dir/pid"
  log "started (nice 19, pid $!): $* (log: $dir/log)"
}

cmd_stop() {
  local dir=${1:?usage: scripts/background.sh stop DIR} quiet=${2:-} pid
  [[ -f "$dir/pid" ]] || return 0
  pid=$(<"$dir/pid")
  rm -f "$dir/pid"
  # The exit status first: an ended job whose parent was not reaped yet still answers kill -0.
  if [[ ! -f "$dir/rc" ]]; then
    kill -- "-$pid" 2>/dev/null || true
    [[ -n "$quiet" ]] || log "stopped before it finished (log: $dir/log)"
  elif [[ "$(<"$dir/rc")" != 0 ]]; then
    [[ -n "$quiet" ]] || { tail -n 20 "$dir/log" >&2; log "failed with exit status $(<"$dir/rc") (log: $dir/log)"; }
  else
    [[ -n "$quiet" ]] || log "finished (log: $dir/log)"
  fi
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  *) echo "usage: scripts/background.sh start DIR -- COMMAND... | stop DIR" >&2; exit 2 ;;
esac
