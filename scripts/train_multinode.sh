#!/usr/bin/env bash
# Launch train.py on this node as one of NNODES (run the same command on every node).
#   MASTER_ADDR=host0 MASTER_PORT=29500 NNODES=2 NPROC_PER_NODE=8 scripts/train_multinode.sh configs/resnest50.yaml [KEY=VALUE ...]
# c10d rendezvous at MASTER_ADDR:MASTER_PORT; MAX_RESTARTS elastic restarts resume from the newest checkpoint.
set -euo pipefail
CONFIG=${1:?usage: train_multinode.sh CONFIG [KEY=VALUE ...]}
shift
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}"
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RDZV_ID=${RDZV_ID:-resnest-$(basename "$CONFIG" .yaml)}
PYTHON=${PYTHON:-python}
# The elastic agent otherwise reuses its rendezvous store across restarts, and the restarted group can fail
# to connect or hang (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
cd "$(dirname "$0")/.."
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
  --max-restarts="$MAX_RESTARTS" train.py --config "$CONFIG" "$@"
