#!/usr/bin/env bash
# Builds the Debian test image (curl, CA certificates, python3, git) used by the network and
# workspace tests: debootstrap (minbase) from Debian's mirror, wrapped as an OCI archive at
# ~/.cache/matchlock/fixtures/debian-test-<package-list hash>.tar, with debian-test.tar
# pointing at it. Cached: does nothing when that archive exists.
set -euo pipefail
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/matchlock"
PACKAGES=curl,ca-certificates,python3-minimal,git
OUT="$CACHE/fixtures/debian-test-$(echo "$PACKAGES" | sha256sum | cut -c1-12).tar"
LINK="$CACHE/fixtures/debian-test.tar"
MIRROR="${MATCHLOCK_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if [ -s "$OUT" ]; then ln -sfn "$(basename "$OUT")" "$LINK"; exit 0; fi
ROOT_DIR="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$CACHE/fixtures"
WORK="$(mktemp -d "$CACHE/fixtures/debian-test.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "Building the Debian test image (debootstrap, ~1 min)..." >&2
debootstrap --variant=minbase --include="$PACKAGES" \
  bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
rm -rf "$WORK/rootfs"/usr/share/{doc,man,info,locale} "$WORK/rootfs"/var/lib/apt/lists/* "$WORK/rootfs"/var/cache/apt/*
tar --numeric-owner --xattrs -C "$WORK/rootfs" -cf "$WORK/layer.tar" .
python3 "$ROOT_DIR/tests/fixtures/make_images.py" --rootfs "$WORK/layer.tar" "$WORK/image.tar"
mv "$WORK/image.tar" "$OUT"
ln -sfn "$(basename "$OUT")" "$LINK"
rm -f "$CACHE/fixtures/debian-net.tar"   # the previous, git-less image
echo "$OUT" >&2
