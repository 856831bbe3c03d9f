#!/usr/bin/env bash
# Train on one machine: one worker per GPU (NPROC workers if set; one on a CPU-only machine).
#
#   launch/single_node.sh CONFIG.yaml [dotted.key=value ...]
#   NPROC=2 launch/single_node.sh configs/tiny.yaml training.train_steps=20
#   launch/single_node.sh configs/paper/s_lowrank32.yaml --dry-run --device H100
#
#   launch/single_node.sh --help
#
# Logs of every rank go to <run_dir>/logs/<date>-<pid>/; a failed worker makes torchrun restart the
# group (MAX_RESTARTS, default 3), which resumes from the latest checkpoint. The trainer's checks run
# once before torchrun starts. Ctrl-C or SIGTERM: the workers save at the end of the step and the
# script exits 0; a second Ctrl-C stops at once.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

sffn_parse_args "$@"
nproc="$(sffn_nproc)"
sffn_set_env "$nproc"
if [ "$SFFN_DRY_RUN" = 1 ]; then
  sffn_dry_run "$nproc" "$nproc"
fi
run_dir="$(sffn_preflight "$nproc")"
sffn_torchrun "$run_dir/logs/$(date +%Y%m%d-%H%M%S)-$$" --standalone --nnodes 1 --nproc-per-node "$nproc"
