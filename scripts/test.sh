#!/usr/bin/env bash
# The whole test suite: set up (idempotent), lint, type-check, unit and integration tests
# (integration tests boot real VMs from the "python" template).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
code=(src tests); for d in benchmarks examples; do [ -d "$d" ] && code+=("$d"); done
.venv/bin/ruff check "${code[@]}"
.venv/bin/ruff format --check "${code[@]}"
.venv/bin/mypy
.venv/bin/python -m pytest -ra "$@"
