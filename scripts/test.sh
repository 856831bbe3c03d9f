#!/usr/bin/env bash
# Sets up the environment from the project's files, then runs the test suite.
# Extra arguments go to pytest (for example: bash scripts/test.sh -k structured).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
venv="${SFFN_VENV:-$root/.venv}"
cd "$root"
exec "$venv/bin/python" -m pytest -q -ra "$@"
