#!/usr/bin/env bash
# Launch train.py on this node as one of NNODES (run the same command on every node).
#   MASTER_ADDR=host0 MASTER_PORT=29500 NNODES=2 NPROC_PER_NODE=8 scripts/train_multinode.sh configs/resnest50.yaml [KEY=VALUE ...]
# c10d rendezvous at MASTER_ADDR:MASTER_PORT; MAX_RESTARTS elastic restarts resume from the newest checkpoint.
# SIGUSR1 or SIGTERM to this script (or to its whole process group) is a stop request: the workers finish the
# step, checkpoint and exit 0, and so does this script; rerunning the same command continues the run.
set -euo pipefail
CONFIG=${1:?usage: train_multinode.sh CONFIG [KEY=VALUE ...]}
shift
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}"
PYTHON=${PYTHON:-python}
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RDZV_ID=${RDZV_ID:-resnest-$(basename "$CONFIG" .yaml)}
# The elastic agent otherwise reuses its rendezvous store across restarts, and the restarted group can fail
# to connect or hang (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
cd "$(dirname "$0")/.."

# Stop signals go to the workers only, from here. torchrun must not act on them: SIGUSR1's default action
# kills it (rc 138) and orphans the workers, which run in their own sessions; a signal torchrun handles
# (--signals-to-handle) makes it forward the signal, then exit 1 with SignalException even when the workers
# saved and exited 0, and a second delivery (SLURM signals every process of a step) interrupts its shutdown
# wait. So torchrun starts with SIGTERM and SIGUSR1 ignored (an ignored disposition survives exec; workers
# inherit it until the trainer installs its handlers) and handles only SIGINT/SIGHUP/SIGQUIT (abort). It
# then sees its workers exit 0 and exits 0 itself; a restart never happens because no worker failed.
agent=
forward() {
  [[ -n $agent ]] && pkill "-$1" -P "$agent" || true  # the workers are torchrun's direct children
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
(
  trap '' TERM USR1
  exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
    --max-restarts="$MAX_RESTARTS" --signals-to-handle=SIGINT,SIGHUP,SIGQUIT \
    train.py --config "$CONFIG" "$@"
) &
agent=$!
# `wait` returns early whenever a trapped signal arrives; bash keeps the exit status once torchrun is reaped.
while kill -0 "$agent" 2>/dev/null; do
  wait "$agent" || true
done
status=0
wait "$agent" || status=$?
exit "$status"
