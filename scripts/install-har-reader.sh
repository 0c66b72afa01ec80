#!/usr/bin/env bash
# Installs a HAR reader for the audit tests (PyPI `haralyzer` with its dependencies, pinned)
# into the cache, idempotent. Prints the directory to put on PYTHONPATH.
set -euo pipefail
exec "$(dirname "$0")/pip-cache.sh" har-reader haralyzer==2.4.0 cached-property==2.0.1 python-dateutil==2.9.0.post0 \
  six==1.17.0
