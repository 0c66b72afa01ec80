#!/usr/bin/env bash
# Installs the original project's Python SDK (PyPI `matchlock`, pinned version and hash)
# into the cache, for the SDK compatibility tests; idempotent. Prints the directory to put
# on PYTHONPATH.
set -euo pipefail
VERSION=0.2.17
SHA256=65be1d27af06860503ec7909a5a99d9343b974cbe92c21e4a5f9bef544332ec2
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/matchlock"
dir="$CACHE/python-sdk/$VERSION"
wheel="$dir/matchlock-$VERSION-py3-none-any.whl"
if [ ! -f "$dir/site/matchlock/client.py" ]; then
  mkdir -p "$dir"
  if [ ! -f "$wheel" ] || ! echo "$SHA256  $wheel" | sha256sum -c --quiet 2>/dev/null; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: "matchlock==$VERSION" -d "$dir" >&2
  fi
  echo "$SHA256  $wheel" | sha256sum -c --quiet
  rm -rf "$dir/site.tmp"
  python3 -m pip install --quiet --no-deps --no-index --target "$dir/site.tmp" "$wheel" >&2
  mv "$dir/site.tmp" "$dir/site"
fi
echo "$dir/site"
