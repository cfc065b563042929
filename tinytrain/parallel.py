"""Parallelism applied to the model from outside, in torchtitan's order:
activation checkpointing -> torch.compile -> FSDP2 (each block, then the root)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from tinytrain.model import Llama


def apply_activation_checkpointing(model: Llama) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Llama) -> None:
    for block in model.layers:
        block.compile(fullgraph=True)


def apply_fsdp(model: Llama, mesh, param_dtype: Optional[torch.dtype] = None) -> None:
    """Shard every block, then the root (embedding, final norm, head). With ``param_dtype``,
    parameters are gathered and computed in that dtype and gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip FSDP2's gradient reduce-scatter on all but the last micro-batch of an accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def _model_parallel_strategy():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy


class FSDP2(_model_parallel_strategy()):
    """Lightning's ModelParallelStrategy with every process in one data-parallel (FSDP) group.

    The parent's "auto" sizes make data-parallel = nodes and tensor-parallel = devices per node;
    pure FSDP across all GPUs of all nodes wants data-parallel = world size. Runs with NCCL on
    GPUs and gloo on CPU.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: Optional[str] = None) -> None:
        """
        Args:
            save_distributed_checkpoint: Each rank writes its own shard (no gather on one rank).
            process_group_backend: "nccl", "gloo", or None to choose by device.
        """
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def register_strategy() -> None:
    """Make `--trainer.strategy fsdp2` (a plain string) mean the FSDP2 strategy above."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register("fsdp2", FSDP2, description="FSDP2 (fully_shard) over every process")
