#!/usr/bin/env bash
# Installs the official MCP Python SDK (PyPI `mcp` with its dependencies, pinned) into the
# cache for the `matchlock mcp` tests, idempotent. Prints the directory to put on PYTHONPATH.
set -euo pipefail
exec "$(dirname "$0")/pip-cache.sh" mcp-client mcp==2.3.0 mcp_types==2.3.0 annotated_types==0.8.0 anyio==4.16.0 \
  attrs==26.1.0 cffi==2.1.1 click==8.5.1 cryptography==51.0.1 h11==0.16.0 httpcore2==2.17.0 httpx2==2.17.0 \
  idna==3.21 jsonschema==4.26.0 jsonschema_specifications==2025.9.1 opentelemetry_api==1.45.3 pycparser==3.12 \
  pydantic==2.14.4 pydantic_core==2.50.5 pyjwt==2.15.1 python_multipart==0.0.34 referencing==0.37.0 \
  rpds_py==2026.9.1 sse_starlette==3.7.1 starlette==1.10.0 truststore==0.10.5 typing_extensions==4.16.0 \
  typing_inspection==0.4.5 uvicorn==0.55.0
