#!/usr/bin/env bash
# Installs a CRI v1 client for the Kubernetes tests (PyPI `container-runtime-interface-api`:
# the CRI protocol's gRPC stubs, with `grpcio`; `websocket-client` for the streaming exec;
# pinned versions) into the cache, idempotent.
# Prints the directory to put on PYTHONPATH.
set -euo pipefail
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/matchlock"
PINS=(container-runtime-interface-api==2.0.1 grpcio==1.85.4 protobuf==6.33.6 typing_extensions==4.16.0
  websocket-client==1.9.2)
dir="$CACHE/cri-client/$(printf '%s\n' "${PINS[@]}" | sha256sum | cut -c1-12)"
if [ ! -f "$dir/site/cri_api/v1/api_pb2_grpc.py" ] || [ ! -d "$dir/site/websocket" ]; then
  rm -rf "$dir/site.tmp"
  mkdir -p "$dir"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --no-deps --only-binary=:all: \
    --target "$dir/site.tmp" "${PINS[@]}" >&2
  mv "$dir/site.tmp" "$dir/site"
fi
echo "$dir/site"
