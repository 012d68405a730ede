#!/usr/bin/env bash
# The whole test suite: set up (idempotent), lint, type-check, unit and integration tests
# (integration tests boot real VMs from the "python" template).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/ruff format --check src tests benchmarks examples
.venv/bin/mypy
.venv/bin/python -m pytest -ra "$@"
