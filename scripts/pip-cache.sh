#!/usr/bin/env bash
# Installs pinned PyPI packages (wheels only, no dependencies resolved: every one is pinned)
# into the cache for a test client, idempotently; prints the directory to put on PYTHONPATH.
#   scripts/pip-cache.sh NAME PIN...      e.g. scripts/pip-cache.sh har-reader haralyzer==2.4.0 …
set -euo pipefail
name=$1
shift
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/matchlock"
dir="$CACHE/$name/$(printf '%s\n' "$@" | sha256sum | cut -c1-12)"
if [ ! -f "$dir/site/.complete" ]; then
  rm -rf "$dir/site.tmp" "$dir/site"
  mkdir -p "$dir"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --no-deps --only-binary=:all: \
    --target "$dir/site.tmp" "$@" >&2
  touch "$dir/site.tmp/.complete"
  mv "$dir/site.tmp" "$dir/site"
fi
echo "$dir/site"
