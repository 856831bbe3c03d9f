#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment from requirements.txt
# and installs the project in editable mode. Idempotent: a stamp holding the hash
# of the dependency files skips the install when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SFFN_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.sffn-deps"
want="$(cat "$root/requirements.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment at $venv" >&2
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dependencies (requirements.txt)" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/requirements.txt"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$root"
  echo "$want" > "$stamp"
fi
