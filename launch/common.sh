# shellcheck shell=bash
# Sourced by the launch scripts: where things are, the environment every worker gets, and the torchrun
# options every launch shares. Each default below yields to a value already set in the environment.
#
# Environment variables every launch script reads (default in parentheses):
#   SFFN_ROOT        the repository (the directory above launch/)
#   SFFN_VENV        virtual environment with the project installed ($SFFN_ROOT/.venv)
#   SFFN_PYTHON      Python to run ($SFFN_VENV/bin/python)
#   NPROC            worker processes on this machine (one per GPU from nvidia-smi, else 1)
#   MAX_RESTARTS     times torchrun restarts the workers after a failure; each restart resumes from the
#                    run directory's latest checkpoint (3)
#   SHUTDOWN_TIMEOUT seconds workers get to save a checkpoint after SIGTERM/SIGINT/SIGUSR1 before SIGKILL (120)
#   OMP_NUM_THREADS  CPU threads per worker (the machine's cores / NPROC)
#   CUDA_DEVICE_MAX_CONNECTIONS       (1) one hardware queue per GPU, as megatron's TP overlap needs
#   TORCH_NCCL_ASYNC_ERROR_HANDLING   (1) a collective stuck on a dead peer raises instead of hanging
#   NCCL_DEBUG                        (WARN)
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE (1) restarted workers get a fresh rendezvous store
#   PYTHONPATH       $SFFN_ROOT is put in front of it
#
# Exit status: 0 when training completed or stopped cleanly on SIGTERM/SIGINT/SIGUSR1 after saving;
# 2 when the preflight refused the launch (nothing started, no restart used); 128 + signal number when a
# signal stopped it before the save finished; 1 when the workers failed more than MAX_RESTARTS times.

SFFN_ROOT="${SFFN_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
SFFN_PYTHON="${SFFN_PYTHON:-${SFFN_VENV:-$SFFN_ROOT/.venv}/bin/python}"

sffn_fail() {
  echo "${0##*/}: $*" >&2
  exit 2
}

# The --help text: the calling script's header comment, then the variables and exit statuses above.
sffn_help() {
  sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p}' "$0"
  echo
  sed -n '/^# Environment variables/,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p}' "$SFFN_ROOT/launch/common.sh"
}

# sffn_parse_args CONFIG [overrides...] [--dry-run [dry-run options]]
# Sets SFFN_ARGS (everything but --dry-run, passed on unchanged) and SFFN_DRY_RUN (0 or 1).
sffn_parse_args() {
  SFFN_DRY_RUN=0
  SFFN_ARGS=()
  local arg
  if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sffn_help
    exit 0
  fi
  for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then SFFN_DRY_RUN=1; else SFFN_ARGS+=("$arg"); fi
  done
  if [ "${#SFFN_ARGS[@]}" -eq 0 ] || [[ "${SFFN_ARGS[0]}" == -* ]]; then
    sffn_fail "usage: ${0##*/} CONFIG.yaml [dotted.key=value ...] [--dry-run [--device NAME] [--assume-mfu F]] (--help for more)"
  fi
  [ -f "${SFFN_ARGS[0]}" ] || sffn_fail "config file ${SFFN_ARGS[0]} not found"
  [ -x "$SFFN_PYTHON" ] || sffn_fail "no Python at $SFFN_PYTHON (run scripts/setup_env.sh or set SFFN_PYTHON)"
}

# Worker processes on this machine: $NPROC, else one per GPU, else 1 (a CPU run).
sffn_nproc() {
  local gpus=0
  if [ -n "${NPROC:-}" ]; then
    [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || sffn_fail "NPROC=$NPROC is not a positive integer"
    echo "$NPROC"
    return
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  fi
  echo $(( gpus > 0 ? gpus : 1 ))
}

# Environment of the workers (each variable keeps a value the user already set).
sffn_set_env() {
  local nproc="$1" cores
  cores="$(nproc 2>/dev/null || echo 1)"
  # Megatron orders tensor-parallel communication before the compute that needs it by keeping a
  # single hardware queue per device.
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
  # A collective stuck on a dead peer raises instead of hanging, so torchrun can restart the group.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  # Restarted workers must not share torchrun's rendezvous store: it keeps the previous attempt's
  # keys, so a restarted group can read a dead peer's address and hang (pytorch/pytorch#135712,
  # reproduced with torch 2.13 and gloo).
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
  # Share the cores between the workers instead of each one spawning a thread per core.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}"
  export PYTHONUNBUFFERED=1
  export PYTHONPATH="$SFFN_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

# sffn_preflight WORLD_SIZE [JOB_ID]: the trainer's checks, once, before torchrun (a refusal exits 2 here
# instead of failing every worker and using up the restarts); prints the run directory, and with JOB_ID
# (multi-node: the rendezvous id, '' for the default) the resolved id on a second line.
sffn_preflight() {
  local job=()
  [ "$#" -ge 2 ] && job=(--job-id "$2")
  "$SFFN_PYTHON" "$SFFN_ROOT/launch/preflight.py" --world-size "$1" "${job[@]}" "${SFFN_ARGS[@]}" || exit 2
}

# sffn_dry_run WORLD_SIZE NPROC: print the plan of this launch instead of training.
sffn_dry_run() {
  exec "$SFFN_PYTHON" -m megatron_sffn.planning --world-size "$1" --nproc-per-node "$2" "${SFFN_ARGS[@]}"
}

# sffn_torchrun LOG_DIR TORCHRUN_OPTIONS...: run the trainer under torchrun with per-rank logs in LOG_DIR
# (stdout/stderr of every rank and attempt, also shown on the console) and elastic restarts.
sffn_torchrun() {
  local log_dir="$1"
  shift
  mkdir -p "$log_dir"
  # torchrun itself, with an exit status of 0 after a clean save-and-stop (see launch/run_torchrun.py).
  export SFFN_STOP_RECORD="$log_dir/stop.json"
  local cmd=(
    "$SFFN_PYTHON" "$SFFN_ROOT/launch/run_torchrun.py" "$@"
    --max-restarts "${MAX_RESTARTS:-3}"
    --log-dir "$log_dir" --tee 3
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-120}"
    -m megatron_sffn.train "${SFFN_ARGS[@]}"
  )
  printf '%q ' "${cmd[@]}" > "$log_dir/command.sh"
  echo >> "$log_dir/command.sh"
  echo "[launch] per-rank logs in $log_dir" >&2
  echo "[launch] $(cat "$log_dir/command.sh")" >&2
  exec "${cmd[@]}"
}
