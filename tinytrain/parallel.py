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
