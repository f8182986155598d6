#!/bin/bash
# One rank of a torch.distributed job, started by `srun` (one task per GPU, or per CPU rank):
# SLURM numbers the tasks, torch.distributed and DeepSpeed read the env:// variables. MASTER_ADDR
# and MASTER_PORT come from the batch script (slurm/pretrain.sbatch), the same for every task.
#   usage: srun slurm/srun_rank.sh COMMAND [ARG...]
set -euo pipefail
: "${MASTER_ADDR:?set by the batch script}" "${MASTER_PORT:?set by the batch script}"
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
# Ranks on this node: the trainer divides a CPU node's cores among them.
export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / SLURM_NNODES))}
exec "$@"
