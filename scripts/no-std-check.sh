#!/usr/bin/env bash
# The device side of the protocol builds for a microcontroller (no_std + alloc): checks (clippy,
# warnings denied) sealed-ota-protocol with `--no-default-features --features device` and the
# minimq example (examples/no-std-device) for NO_STD_TARGET (default thumbv7em-none-eabihf, a
# Cortex-M4F/M7).
# Adds the target with rustup when it is missing; exits non-zero, saying so, when it cannot.
set -euo pipefail

target="${NO_STD_TARGET:-thumbv7em-none-eabihf}"
cargo="${CARGO:-cargo}"
root="$(cd "$(dirname "$0")/.." && pwd)"

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    echo "no-std: adding the Rust target $target (rustup target add)"
    if ! rustup target add "$target"; then
        echo "no-std: FAILED: cannot add the Rust target $target with rustup (offline, or no" \
            "rustup toolchain here); the no_std check did not run" >&2
        exit 1
    fi
fi

cd "$root"
echo "no-std: sealed-ota-protocol (device side) for $target"
"$cargo" clippy --locked -p sealed-ota-protocol --no-default-features --features device \
    --target "$target" -- -D warnings
echo "no-std: examples/no-std-device (DeviceSession over minimq) for $target"
"$cargo" clippy --locked --manifest-path examples/no-std-device/Cargo.toml --target "$target" \
    --target-dir "$root/target" -- -D warnings
