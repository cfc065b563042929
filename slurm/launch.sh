#!/usr/bin/env bash
# Runs inside a SLURM allocation (called by the sbatch scripts): one tinytrain process per task,
# with the number of nodes and processes per node taken from SLURM. Arguments go to `tinytrain fit`.
#
# It runs in the job's working folder (sbatch's: the folder it was called from), where runs/ goes.
# Environment:
#   TINYTRAIN       the command (default: tinytrain; e.g. "/path/to/venv/bin/python -m tinytrain")
#   MASTER_ADDR     rendezvous host (default: the first node of the job)
set -euo pipefail
nodes=${SLURM_JOB_NUM_NODES:-1}
per_node=${SLURM_NTASKS_PER_NODE:-1}
per_node=${per_node%%(*}   # "8(x4)" -> "8"
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export PYTHONUNBUFFERED=1
# A hang or a crash in native code prints every thread's Python stack.
export PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}
# Fewer out-of-memory failures from fragmentation when batch shapes vary (evaluation, the last batch).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# A failed or stuck NCCL collective ends the process (and srun the job) instead of hanging it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

step=(--kill-on-bad-exit=1)
# Slurm 22.05 to 23.02 do not hand sbatch's --cpus-per-task on to srun: each rank and its loader
# workers would share one core. Say it again.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
# Lightning gives local rank r the node's GPU r, so every task must see all GPUs of its node, also
# on sites that bind one GPU per task by default.
if [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 ]]; then step+=(--gpus-per-node="$SLURM_GPUS_ON_NODE" --gpu-bind=none); fi

echo "[tinytrain] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${nodes} node(s) x ${per_node} process(es), ${SLURM_CPUS_PER_TASK:-1} CPU(s) each, rendezvous at ${MASTER_ADDR}, $(date -u +%FT%TZ)"
# On SIGUSR1 (sent by --signal before the time limit, or by `scancel --signal=USR1`) every task
# finishes its step, the job saves a checkpoint and requeues itself; the restart resumes from it.
# The sizes come last: a later argument overrides an earlier one, and SLURM decides these.
srun "${step[@]}" ${TINYTRAIN:-tinytrain} fit "$@" --trainer.num_nodes "$nodes" --trainer.devices "$per_node"
