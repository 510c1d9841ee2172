#!/usr/bin/env bash
# Launch llmtrain with `accelerate launch`; every argument is a Hydra override.
#
# llmtrain only uses accelerate as a process launcher: it reads RANK / WORLD_SIZE / LOCAL_RANK and picks
# its own backend (nccl on GPUs, gloo on CPU), precision (trainer.precision) and strategy (strategy=...).
# Accelerate's `--multi_gpu` mode is its torchrun launcher and also works without GPUs; its `--cpu`
# mode starts ONE process whatever --num_processes says (multi-process CPU there needs MPI), so this
# script uses --multi_gpu whenever more than one process is asked for.
#
#   launch/accelerate.sh strategy=ddp                                     # one process per GPU
#   NPROC_PER_NODE=2 launch/accelerate.sh strategy=ddp trainer.device=cpu  # 2 CPU processes (gloo)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 launch/accelerate.sh strategy=fsdp
#
# Environment: NPROC_PER_NODE (default: the GPU count, 1 without GPUs), NNODES (1), NODE_RANK (0),
# MASTER_ADDR, MASTER_PORT (single node: a free port unless set), ACCELERATE (accelerate), PYTHON (python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
PYTHON="${PYTHON:-python}"
ACCELERATE="${ACCELERATE:-accelerate}"

NPROC_PER_NODE="${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
TOTAL=$((NPROC_PER_NODE * NNODES))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# precision and compilation are llmtrain's (trainer.precision, trainer.compile), not accelerate's
args=(--num_processes "$TOTAL" --num_machines "$NNODES" --mixed_precision no --dynamo_backend no)
if [[ "$TOTAL" -gt 1 ]]; then
  args+=(--multi_gpu --max_restarts 0)
fi
if [[ "$NNODES" -gt 1 ]]; then
  : "${MASTER_ADDR:?set MASTER_ADDR to the address of the node with NODE_RANK=0}"
  args+=(--machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "${MASTER_PORT:-29500}"
         --same_network)
else
  args+=(--main_process_port "${MASTER_PORT:-0}")  # 0: accelerate picks a free port
fi

exec "$ACCELERATE" launch "${args[@]}" -m llmtrain.train "$@"
