#!/usr/bin/env bash
# Launch llmtrain with DeepSpeed's launcher (`deepspeed`); every argument is a Hydra override.
#
#   launch/deepspeed.sh strategy.zero_stage=3                          # one node, one process per GPU
#   NUM_GPUS=2 launch/deepspeed.sh trainer.device=cpu                  # 2 CPU processes (gloo, no GPU needed)
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh strategy.zero_stage=2   # nodes of the hostfile, over ssh
#
# The launcher starts `python -m llmtrain.train --local_rank=N strategy=deepspeed <overrides>` per process;
# llmtrain.train drops --local_rank (LOCAL_RANK is set as well) before Hydra parses the overrides.
# Environment: NUM_GPUS (processes per node; default: the GPU count, 1 without GPUs; with a hostfile:
# its slots), NUM_NODES (default: every host of HOSTFILE), HOSTFILE (unset: this node only),
# MASTER_ADDR (multi-node; default: the first host), MASTER_PORT (default: a free port on one node,
# 29500 with a hostfile), PYTHON (python), LLMTRAIN_DEEPSPEED_VERBOSE=1 (DeepSpeed's own INFO lines).
# Without a GPU DS_ACCELERATOR defaults to cpu (DeepSpeed's CPU accelerator, gloo).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
if [[ "$GPUS" -eq 0 ]]; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

args=()
if [[ -n "${HOSTFILE:-}" ]]; then
  # every host's slots from the hostfile unless NUM_GPUS / NUM_NODES trim them
  args+=(--hostfile="$HOSTFILE" --master_port="${MASTER_PORT:-29500}")
  [[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus="$NUM_GPUS")
  [[ -n "${NUM_NODES:-}" ]] && args+=(--num_nodes="$NUM_NODES")
  [[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr="$MASTER_ADDR")
else
  # no hostfile: this node only (DeepSpeed would otherwise look for /job/hostfile)
  port="${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
  args+=(--hostfile=/dev/null --num_gpus="${NUM_GPUS:-$(( GPUS > 0 ? GPUS : 1 ))}" --master_port="$port")
fi

# the launcher's own INFO lines (ranks, spawned commands) only with LLMTRAIN_DEEPSPEED_VERBOSE=1
[[ "${LLMTRAIN_DEEPSPEED_VERBOSE:-0}" == "0" ]] && args+=(--log_level=error)

exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --module llmtrain.train strategy=deepspeed "$@"
