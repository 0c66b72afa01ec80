#!/usr/bin/env bash
# Dependency policy (deny.toml): every dependency's licence is on the allow-list, no wildcard
# versions, crates only from crates.io; several versions of one crate are listed as warnings.
# Offline: advisories are not checked (the RustSec database lives on GitHub, out of reach).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_DENY_VERSION=0.20.2
if ! cargo deny --version 2>/dev/null | grep -q "$CARGO_DENY_VERSION"; then
  echo "==> installing cargo-deny $CARGO_DENY_VERSION (one time)" >&2
  cargo install --quiet --locked cargo-deny --version "$CARGO_DENY_VERSION"
fi
# cargo-deny reads the metadata of every target's dependencies (windows-sys and the like
# too), which a build on Linux never downloads: fetch them once (crates.io; cached after).
cargo fetch --locked --quiet
cargo deny --offline --log-level error check licenses bans sources
