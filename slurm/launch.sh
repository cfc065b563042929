#!/usr/bin/env bash
# Runs inside a SLURM allocation (called by the sbatch scripts): one tinytrain process per task,
# with the number of nodes and processes per node taken from SLURM. Arguments go to `tinytrain fit`.
#
# It runs in the job's working folder (sbatch's: the folder it was called from), where runs/ goes.
# Environment:
#   TINYTRAIN       the command (default: tinytrain; e.g. "/path/to/venv/bin/python -m tinytrain.cli")
#   MASTER_ADDR     rendezvous host (default: the first node of the job)
set -euo pipefail
nodes=${SLURM_JOB_NUM_NODES:-1}
per_node=${SLURM_NTASKS_PER_NODE:-1}
per_node=${per_node%%(*}   # "8(x4)" -> "8"
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export PYTHONUNBUFFERED=1
echo "[tinytrain] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${nodes} node(s) x ${per_node} process(es), $(date -u +%FT%TZ)"
# On SIGUSR1 (sent by --signal before the time limit, or by `scancel --signal=USR1`) every task
# finishes its step, the job saves a checkpoint and requeues itself; the restart resumes from it.
# The sizes come last: a later argument overrides an earlier one, and SLURM decides these.
srun --kill-on-bad-exit=1 ${TINYTRAIN:-tinytrain} fit "$@" --trainer.num_nodes "$nodes" --trainer.devices "$per_node"
