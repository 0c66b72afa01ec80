#!/usr/bin/env bash
# Installs a CRI v1 client for the Kubernetes tests (PyPI `container-runtime-interface-api`:
# the CRI protocol's gRPC stubs, with `grpcio`; `websocket-client` for the streaming exec;
# pinned versions) into the cache, idempotent. Prints the directory to put on PYTHONPATH.
set -euo pipefail
exec "$(dirname "$0")/pip-cache.sh" cri-client container-runtime-interface-api==2.0.1 grpcio==1.85.4 \
  protobuf==6.33.6 typing_extensions==4.16.0 websocket-client==1.9.2
