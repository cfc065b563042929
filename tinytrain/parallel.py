"""Switches applied to the model from outside, in torchtitan's order:
float8 linears -> activation checkpointing -> torch.compile -> FSDP2 (each block, then the root)."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from tinytrain.model import Llama

log = logging.getLogger(__name__)


def apply_activation_checkpointing(model: Llama) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Llama) -> None:
    """torch.compile each transformer block (one graph per block, reused by all 22)."""
    for block in model.layers:
        block.compile(fullgraph=True)


def apply_compile_loss(model: Llama) -> None:
    """torch.compile the final norm, output head and cross-entropy (``Llama.head_loss``)."""
    model.head_loss = torch.compile(model.head_loss, fullgraph=True)


def _float8_eligible(module: nn.Module, fqn: str) -> bool:
    # The blocks' projections; not the output head, whose logits feed the loss directly. torch's
    # scaled matmul needs both dimensions divisible by 16.
    return (isinstance(module, nn.Linear) and fqn.startswith("layers.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_float8(model: Llama, device: Optional[torch.device] = None) -> int:
    """Experimental: train the blocks' linear layers with float8 matmuls (torchao, dynamic
    tensorwise scaling). Needs a GPU of compute capability 8.9 or newer (H100, L4, RTX 4090);
    also runs, slowly, on CPU. Returns the number of layers converted."""
    if device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise RuntimeError(f"model.float8 needs a GPU of compute capability 8.9 or newer (Hopper, Ada); "
                           f"{torch.cuda.get_device_name(device)} is {torch.cuda.get_device_capability(device)}")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise RuntimeError("model.float8 needs the torchao package: pip install 'tinytrain[float8]'") from e
    convert_to_float8_training(model, module_filter_fn=_float8_eligible)
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    log.info("float8 matmuls in %d linear layers (experimental)", converted)
    return converted


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


def prepare(model: Llama, *, attention: str = "auto", loss_chunk_size: int = 0, float8: bool = False,
            activation_checkpointing: bool = False, compile: bool = False, compile_loss: bool = False,
            device: Optional[torch.device] = None) -> None:
    """Apply the recipe's speed switches to an unsharded model, in the order they compose."""
    model.set_attention_backend(attention)
    model.loss_chunk_size = loss_chunk_size
    if float8:
        apply_float8(model, device)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if compile_loss:
        apply_compile_loss(model)


def build_sharded(config, mesh, device: torch.device, param_dtype: Optional[torch.dtype] = None,
                  **switches) -> Llama:
    """The model as FSDP2 training holds it: built on the meta device, switched (see ``prepare``),
    sharded over ``mesh``, then materialised on ``device`` with TinyLlama's initialisation (each
    rank initialises its own shards)."""
    with torch.device("meta"):
        model = Llama(config)
    prepare(model, device=device, **switches)
    apply_fsdp(model, mesh, param_dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    return model


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
