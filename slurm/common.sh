# shellcheck shell=bash
# Sourced by every slurm/*.sbatch: run from the repository root with its interpreter, and say where.
#
# sbatch runs a spooled copy of the script, so the repository cannot be found from $0: it is the
# directory the job was submitted from ($SLURM_SUBMIT_DIR), or $SCGRAPH_ROOT when set.
#   SCGRAPH_ROOT  the repository (default: the submit directory)
#   PYTHON        the interpreter (default: $SCGRAPH_ROOT/.venv/bin/python when present, else python3)

set -euo pipefail
SCGRAPH_ROOT=${SCGRAPH_ROOT:-${SLURM_SUBMIT_DIR:?run this script with sbatch}}
cd "$SCGRAPH_ROOT"
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=$SCGRAPH_ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export SCGRAPH_ROOT PYTHON
echo "scgraph: job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}," \
    "restart ${SLURM_RESTART_COUNT:-0}, on ${SLURM_JOB_NODELIST}, $(date -Is)"
