#!/usr/bin/env bash
# Builds the Debian test image (curl, CA certificates, python3) used by the network tests:
# debootstrap (minbase) from Debian's mirror, wrapped as an OCI archive at
# ~/.cache/matchlock/fixtures/debian-net.tar. Cached: does nothing when the archive exists.
set -euo pipefail
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/matchlock"
OUT="$CACHE/fixtures/debian-net.tar"
MIRROR="${MATCHLOCK_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
[ -s "$OUT" ] && exit 0
ROOT_DIR="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$CACHE/fixtures"
WORK="$(mktemp -d "$CACHE/fixtures/debian-net.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "Building the Debian test image (debootstrap, ~1 min)..." >&2
debootstrap --variant=minbase --include=curl,ca-certificates,python3-minimal \
  bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
rm -rf "$WORK/rootfs"/usr/share/{doc,man,info,locale} "$WORK/rootfs"/var/lib/apt/lists/* "$WORK/rootfs"/var/cache/apt/*
tar --numeric-owner --xattrs -C "$WORK/rootfs" -cf "$WORK/layer.tar" .
python3 "$ROOT_DIR/tests/fixtures/make_images.py" --rootfs "$WORK/layer.tar" "$WORK/image.tar"
mv "$WORK/image.tar" "$OUT"
echo "$OUT" >&2
