#!/usr/bin/env bash
# Builds the static guest-init binary and prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release --locked \
  -p matchlock-guest --target "$target" >&2
echo "$PWD/target/$target/release/guest-init"
