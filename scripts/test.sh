#!/usr/bin/env bash
# The whole test suite: setup (idempotent, cached), formatting, lints, unit tests and the
# VM integration tests (real kernel under QEMU, real images).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --no-demo
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
scripts/deny.sh
# VM tests boot real guests: two at a time is what 2 cores allow. Sandboxes resume warm
# templates by default; the VM suites then run again booting every sandbox cold.
cargo test --locked --workspace -- --test-threads=2
MATCHLOCK_COLD=1 cargo test --locked -p matchlock-sandbox -p matchlock \
  --test guest_protocol --test snapshots --test hostile --test images --test lifecycle \
  --test network --test run --test rust_sdk --test sdk --test volumes --test workspace \
  -- --test-threads=2
# Every fuzz target briefly (scripts/fuzz.sh <seconds> for longer runs); a crash fails.
scripts/fuzz.sh 20
# A short fault campaign (bench/faults 50 for the full one): random SIGKILLs, then gc, no leaks.
bench/faults 5
# The Debian package, installed into a fresh Debian root (cached), runs a sandbox there.
scripts/test-package.sh
