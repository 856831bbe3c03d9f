#!/usr/bin/env bash
# Sets up the environment from the project's files, then checks lint and formatting (ruff) and runs the test suite.
# Extra arguments go to pytest (for example: bash scripts/test.sh -k structured).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
venv="${SFFN_VENV:-$root/.venv}"
cd "$root"
# Lint and format check first (configured in pyproject.toml): seconds, and a style slip fails like a test.
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
exec "$venv/bin/python" -m pytest -q -ra "$@"
