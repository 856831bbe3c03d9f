#!/usr/bin/env bash
# Main job on the embedded default. Until the trainer lands this runs the FFN
# benchmark at a CPU-friendly size: dense against every structure at 63% and 32%.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
venv="${SFFN_VENV:-$root/.venv}"
cd "$root"
exec "$venv/bin/python" benchmarks/ffn_bench.py --width 512 --tokens 2048 "$@"
