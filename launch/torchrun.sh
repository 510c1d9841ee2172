#!/usr/bin/env bash
# Launch llmtrain with torchrun (torch.distributed.run); every argument is a Hydra override.
#
#   launch/torchrun.sh strategy=ddp                                    # one node, one process per GPU
#   NPROC_PER_NODE=2 launch/torchrun.sh strategy=fsdp trainer.device=cpu   # 2 CPU processes (gloo)
#   # two nodes: run on each, NODE_RANK=0 on the node whose address is MASTER_ADDR
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 launch/torchrun.sh strategy=fsdp
#
# Environment: NPROC_PER_NODE (default: the GPU count, 1 without GPUs), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500; single node: a free port unless set), PYTHON (python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
PYTHON="${PYTHON:-python}"

NPROC_PER_NODE="${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [[ "$NNODES" -gt 1 ]]; then
  : "${MASTER_ADDR:?set MASTER_ADDR to the address of the node with NODE_RANK=0}"
  rdzv=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR"
        --master_port="${MASTER_PORT:-29500}")
elif [[ -n "${MASTER_PORT:-}" ]]; then
  rdzv=(--nnodes=1 --node_rank=0 --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="$MASTER_PORT")
else
  rdzv=(--standalone --nnodes=1)  # a local rendezvous on a free port
fi

exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node="$NPROC_PER_NODE" --max_restarts=0 \
  -m llmtrain.train "$@"
