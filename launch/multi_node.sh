#!/usr/bin/env bash
# Train on several machines: run this same command on every node (by hand, from a scheduler's
# per-node command, or through launch/slurm.sbatch). The nodes find each other through a c10d
# rendezvous hosted by torchrun on HEAD; no node needs a fixed rank.
#
#   NNODES=2 HEAD=node01 launch/multi_node.sh CONFIG.yaml [dotted.key=value ...]
#
#   NNODES   number of nodes (required), or MIN:MAX for an elastic range
#   HEAD     host name or address of the node that hosts the rendezvous (required; any one node)
#   PORT     rendezvous port on HEAD (default 29500)
#   RUN_ID   rendezvous id, the same on every node of one launch (default: derived from the run directory)
#   NPROC    workers per node (default: one per GPU)
#
# Every node writes its ranks' logs to <run_dir>/logs/<RUN_ID>/<host>-<pid>/ (a shared file system
# keeps them together). Restarts after a failure (MAX_RESTARTS, default 3) re-form the group on all
# nodes and resume from the latest checkpoint. The trainer's checks run once per node before torchrun.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

sffn_parse_args "$@"
[ -n "${NNODES:-}" ] || sffn_fail "set NNODES (number of nodes, or MIN:MAX)"
[[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || sffn_fail "NNODES=$NNODES is not N or MIN:MAX"
nproc="$(sffn_nproc)"
sffn_set_env "$nproc"
if [ "$SFFN_DRY_RUN" = 1 ]; then
  sffn_dry_run "$(( ${NNODES##*:} * nproc ))" "$nproc"
fi
[ -n "${HEAD:-}" ] || sffn_fail "set HEAD (host of the rendezvous, the same on every node)"
port="${PORT:-29500}"
checked="$(sffn_preflight "$(( ${NNODES##*:} * nproc ))" "${RUN_ID:-}")"
run_dir="${checked%%$'\n'*}"
run_id="${checked#*$'\n'}"
sffn_torchrun "$run_dir/logs/$run_id/$(hostname)-$$" \
  --nnodes "$NNODES" --nproc-per-node "$nproc" \
  --rdzv-backend c10d --rdzv-endpoint "$HEAD:$port" --rdzv-id "$run_id"
