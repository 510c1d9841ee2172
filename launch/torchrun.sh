#!/usr/bin/env bash
# Launch llmtrain with torchrun (torch.distributed.run); every argument is a Hydra override.
#
#   launch/torchrun.sh strategy=ddp                                    # one node, one process per GPU
#   NPROC_PER_NODE=2 launch/torchrun.sh strategy=fsdp trainer.device=cpu   # 2 CPU processes (gloo)
#   # two nodes: the same command on each; a c10d rendezvous at MASTER_ADDR:MASTER_PORT (the store runs on
#   # the node that owns MASTER_ADDR) assigns the node ranks, so NODE_RANK is not needed (and is ignored)
#   NNODES=2 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 launch/torchrun.sh strategy=fsdp
#
# Environment: NPROC_PER_NODE (default: the GPU count, 1 without GPUs), NNODES (1), MASTER_ADDR (127.0.0.1;
# several nodes: required), MASTER_PORT (29500; single node: a free port unless set), RDZV_ID (several nodes:
# the job's id, llmtrain; the same on every node), PYTHON (python). NODE_RANK is accepted and ignored.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
PYTHON="${PYTHON:-python}"

NPROC_PER_NODE="${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [[ "$NNODES" -gt 1 ]]; then
  # c10d rendezvous: every node runs this same command and torchrun assigns node ranks (NODE_RANK is ignored).
  : "${MASTER_ADDR:?set MASTER_ADDR to the address of one of the nodes (it hosts the rendezvous)}"
  rdzv=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT:-29500}"
        --rdzv_id="${RDZV_ID:-llmtrain}")
elif [[ -n "${MASTER_PORT:-}" ]]; then
  rdzv=(--nnodes=1 --node_rank=0 --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="$MASTER_PORT")
else
  rdzv=(--standalone --nnodes=1)  # a local rendezvous on a free port
fi

exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node="$NPROC_PER_NODE" --max_restarts=0 \
  -m llmtrain.train "$@"
