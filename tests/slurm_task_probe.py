"""Stands in for `tinytrain` under slurm/launch.sh in a test job: prints what one task was given."""

import os
import sys

names = ("PYTHONFAULTHANDLER", "PYTORCH_CUDA_ALLOC_CONF", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "MASTER_ADDR")
print(f"task {os.environ.get('SLURM_PROCID')}: cpus {len(os.sched_getaffinity(0))}; "
      + "; ".join(f"{k}={os.environ.get(k)}" for k in names) + f"; args {' '.join(sys.argv[1:])}", flush=True)
