#!/usr/bin/env bash
# The base of make bench's delta figures: the device agent's release binary (what a device runs)
# built from an earlier commit (default: the last commit before HEAD that changed the agent or a
# crate it links), exported with git archive (no worktree is registered) and built in a target
# directory of its own, then copied to target/bench/delta/base. The target of the pair is the agent `make bench` builds from this
# commit. Usage: scripts/delta-pair.sh [COMMIT]. A cold release build: minutes, several GB under
# target/bench/delta (removed again except for the binary). make bench strips the target the same
# way into target/bench/delta/target.
set -euo pipefail
cd "$(dirname "$0")/.."
commit="${1:-$(git log -1 --format=%H HEAD^ -- agent device protocol mqtt Cargo.lock)}"
out=target/bench/delta
src="$out/src"
rm -rf "$src"
mkdir -p "$src"
git archive "$commit" | tar -x -C "$src"
CARGO_INCREMENTAL=0 cargo build --release --locked -p sealed-ota-agent \
  --manifest-path "$src/Cargo.toml" --target-dir "$out/target"
# Stripped, as a device receives it (the release profile keeps line tables).
strip -o "$out/base" "$out/target/release/sealed-ota-agent"
git rev-parse "$commit" > "$out/base.commit"
rm -rf "$src" "$out/target"
echo "delta base: $out/base (agent at $(cat "$out/base.commit"))"
