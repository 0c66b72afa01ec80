#!/usr/bin/env bash
# Installs everything matchlock needs on a Debian 12 host, idempotently and cached:
# Debian packages, the guest kernel, guest-init and the test image.
# Usage: scripts/setup.sh [--deps-only] [--no-demo]
#   --deps-only  only the system dependencies (packages)
#   --no-demo    everything but the demo sandbox at the end
set -euo pipefail

cd "$(dirname "$0")/.."
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/matchlock"

log() { printf '==> %s\n' "$*" >&2; }

deps_only=0
demo=1
for arg in "$@"; do
  case "$arg" in
    --deps-only) deps_only=1 ;;
    --no-demo) demo=0 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

bash scripts/install-deps.sh
[ $deps_only -eq 1 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then PREFIX=${PREFIX:-/usr/local}; else PREFIX=${PREFIX:-$HOME/.local}; fi
log "building matchlock and guest-init"
cargo build --quiet --release --locked -p matchlock
guest_init=$(scripts/build-guest.sh)
mkdir -p "$PREFIX/bin" "$CACHE"
install -m 0755 target/release/matchlock "$PREFIX/bin/matchlock"
install -m 0755 target/release/containerd-shim-matchlock-v1 "$PREFIX/bin/containerd-shim-matchlock-v1"
install -m 0755 "$guest_init" "$CACHE/guest-init"
MATCHLOCK="$PREFIX/bin/matchlock"
log "installed $MATCHLOCK, $PREFIX/bin/containerd-shim-matchlock-v1 and $CACHE/guest-init"

log "guest kernel (built once from linux-source-6.1, ~8 min on 2 cores; cached)"
"$MATCHLOCK" kernel build

log "demo image matchlock-busybox (built from Debian's busybox-static)"
python3 tests/fixtures/make_images.py "$CACHE/fixtures"
"$MATCHLOCK" image import matchlock-busybox < "$CACHE/fixtures/busybox.tar" >/dev/null

log "network test image (Debian minbase with curl and python3, by debootstrap; cached)"
scripts/build-test-image.sh

log "the original project's Python SDK from PyPI (for the SDK compatibility tests; cached)"
# Only the SDK tests need it (they install it themselves too): a failure here is a warning.
PIP_ROOT_USER_ACTION=ignore scripts/install-python-sdk.sh >/dev/null ||
  log "warning: could not install the Python SDK from PyPI (only the SDK tests need it)"

if [ $demo -eq 1 ]; then
  log "running a sandbox: $MATCHLOCK run --image matchlock-busybox -- sh -c '...'"
  "$MATCHLOCK" run --image matchlock-busybox -- sh -c 'echo "hello from $(hostname), kernel $(uname -r)"'
fi
case ":$PATH:" in *":$PREFIX/bin:"*) ;; *) log "add $PREFIX/bin to your PATH" ;; esac
