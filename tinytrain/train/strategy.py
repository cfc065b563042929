"""The Lightning strategy for FSDP2 across every process of every node (``--trainer.strategy fsdp2``),
and the model built as the run's strategy trains it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from tinytrain.errors import CheckpointError, ConfigError
from tinytrain.lightning_private import unwrap_optimizer
from tinytrain.store.layout import OUTER_PREFIX

if TYPE_CHECKING:
    from tinytrain.model.llama import Llama


class FSDP2(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with every process in one data-parallel (FSDP) group.

    The parent's "auto" sizes make data-parallel = nodes and tensor-parallel = devices per node;
    pure FSDP across all GPUs of all nodes wants data-parallel = world size. Runs with NCCL on
    GPUs and gloo on CPU. The model is sharded in ``LitLlama.configure_model`` over
    ``fsdp_mesh``.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: Optional[str] = None,
                 gather_once_per_step: bool = True, hybrid: bool = False,
                 shard_group_size: Optional[int] = None) -> None:
        """
        Args:
            save_distributed_checkpoint: Each rank writes its own shard (no gather on one rank).
            process_group_backend: "nccl", "gloo", or None to choose by device.
            gather_once_per_step: With gradient accumulation, all-gather each block's parameters
                once per optimizer step and keep them until the last micro-batch's backward,
                instead of twice per micro-batch (forward and backward). Holds the whole model,
                unsharded in the compute dtype (2.2 GB for the 1.1B model in bf16), during a step.
            hybrid: Hybrid sharding (HSDP): shard within groups of ``shard_group_size`` processes
                and replicate across groups, so parameter all-gathers stay inside a node and only
                gradients cross nodes (one all-reduce per step).
            shard_group_size: Processes per shard group with ``hybrid``; default: the processes
                of one node. Must divide the world size.
        """
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)
        if shard_group_size is not None and shard_group_size <= 0:
            raise ConfigError(f"trainer.strategy.shard_group_size must be positive, got {shard_group_size}")
        if shard_group_size is not None and not hybrid:
            raise ConfigError("trainer.strategy.shard_group_size is only used with trainer.strategy.hybrid: true")
        self.gather_once_per_step, self.hybrid, self.shard_group_size = gather_once_per_step, hybrid, shard_group_size
        self.fsdp_mesh = None
        self.islands = None  # tinytrain.train.local_sgd.Islands: set with local_sgd, which also sets fsdp_mesh

    # Lightning builds the state dicts of a save with cpu_offload=True: a synchronous, pageable
    # device-to-host copy of every shard inside the step loop, before DCP (which copies to the host
    # as it writes, or in its stager for an asynchronous save) copies again. A sharded save needs
    # no offload; a full state dict gathered on rank 0 keeps it (rank 0 could not hold it on a GPU).
    def lightning_module_state_dict(self) -> dict:
        if not self._save_distributed_checkpoint:
            return super().lightning_module_state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=False, cpu_offload=False))
        prefix = self.islands.key_prefix() if self.islands is not None else ""
        # Local SGD: an island's own weights (and weight average) under its own keys; the global state once.
        return {k if not prefix or k.startswith(OUTER_PREFIX) else prefix + k: v for k, v in state.items()}

    def optimizer_state(self, optimizer) -> dict:
        if not self._save_distributed_checkpoint:
            return super().optimizer_state(optimizer)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, unwrap_optimizer(optimizer),
                                         options=StateDictOptions(full_state_dict=False, cpu_offload=False))
        prefix = self.islands.key_prefix() if self.islands is not None else ""
        return {prefix.rstrip("."): state} if prefix else state  # Local SGD: each island's inner optimizer

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        # Lightning's reader unpickles a sharded checkpoint's metadata and byte items as they come:
        # tinytrain.store.safeload makes it refuse anything but metadata classes, tensors and plain values.
        from torch.distributed.checkpoint.api import CheckpointException

        from tinytrain.store import safeload

        safeload.harden()
        try:
            if self.islands is not None:
                return self._load_island_checkpoint(Path(self.broadcast(checkpoint_path)), weights_only)
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        except CheckpointException as e:  # each rank's error, gathered: ours is one line
            inner = safeload.unwrap(e)
            if inner is None:
                raise
            raise inner from None

    def _load_island_checkpoint(self, path: Path, weights_only) -> dict:
        """Local SGD's resume: this island's weights and inner optimizer from its own keys (island 0's,
        or the only ones, of a checkpoint saved without islands), the global state from ``outer.*``
        (started at the loaded weights when the checkpoint has none). Returns the non-tensor state."""
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        from tinytrain.lightning_private import SHARDED_META

        if not path.is_dir():
            raise ConfigError(f"{path}: local_sgd resumes from sharded checkpoints only (this one is a single file); "
                              "start from its weights with model.init_from instead")
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata  # flattened "state_dict.<key>"
        prefix = self.islands.key_prefix()
        own = bool(prefix) and any(k.startswith(f"state_dict.{prefix}") for k in saved)
        has_outer = any(k.startswith(f"state_dict.{OUTER_PREFIX}") for k in saved)
        module = self.lightning_module

        def saved_key(k: str) -> str:
            return prefix + k if own and not k.startswith(OUTER_PREFIX) else k

        wanted = {k: v for k, v in get_model_state_dict(module).items() if has_outer or not k.startswith(OUTER_PREFIX)}
        request = {"state_dict": {saved_key(k): v for k, v in wanted.items()}}
        dcp.load(request, checkpoint_id=str(path))
        missing, unexpected = module.load_state_dict({k: request["state_dict"][saved_key(k)] for k in wanted},
                                                     strict=False)
        missing = [k for k in missing if not k.startswith(OUTER_PREFIX)]
        if (missing or unexpected) and module.strict_loading:
            raise CheckpointError(f"{path}: does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        outer = module.outer
        if not has_outer:  # a checkpoint saved without local_sgd: the global weights start at its weights
            with torch.no_grad():
                torch._foreach_copy_(outer.local_weights(), outer.locals_of(module.model))
        outer.restored = has_outer
        for i, optimizer in enumerate(self.optimizers):
            state = get_optimizer_state_dict(module, optimizer)
            key = prefix.rstrip(".")
            request = {f"optimizer_{i}": {key: state} if own else state}
            dcp.load(request, checkpoint_id=str(path))
            set_optimizer_state_dict(module, optimizer, optim_state_dict=request[f"optimizer_{i}"][key] if own
                                     else request[f"optimizer_{i}"])
        return torch.load(path / SHARDED_META, weights_only=weights_only)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
        self.fsdp_mesh = self._fsdp_mesh()

    def _fsdp_mesh(self):
        """The mesh FSDP2 shards over: 1-D over every process, or (replicate, shard) with ``hybrid``."""
        if not self.hybrid:
            return self.device_mesh["data_parallel"]
        from torch.distributed.device_mesh import init_device_mesh

        world = self.num_nodes * self.num_processes
        size = self.shard_group_size or self.num_processes
        if world % size:
            raise ConfigError(f"trainer.strategy.shard_group_size={size} does not divide the world size {world} "
                             f"({self.num_nodes} nodes x {self.num_processes} processes)")
        return init_device_mesh(self.root_device.type, (world // size, size), mesh_dim_names=("replicate", "shard"))


def register_strategy() -> None:
    """Make `--trainer.strategy fsdp2` (a plain string) mean the FSDP2 strategy above."""
    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register("fsdp2", FSDP2, description="FSDP2 (fully_shard) over every process")


def build_model(trainer, config, switches, spec) -> Llama:
    """The model as ``trainer``'s strategy trains it (None: on the CPU, unsharded): under FSDP2 built
    on the meta device and sharded, computing in the precision's dtype over fp32 master weights;
    otherwise whole on the strategy's device. ``spec`` (the data's, or None) gives the BOS id that
    starts each document, for document masking."""
    import torch

    from tinytrain.train import parallel

    strategy = trainer.strategy if trainer is not None else None
    bos_id = spec.bos_id if spec is not None and spec.bos_id is not None else 1
    if switches.document_masking and spec is not None and not spec.bos_per_document:
        raise ConfigError("model.document_masking finds documents by the BOS in front of each, but the data was "
                          "prepared without it (its manifest says bos: false); prepare it with bos: true")
    if not isinstance(strategy, ModelParallelStrategy):
        return parallel.build(config, switches, strategy.root_device if strategy is not None else None, bos_id)
    precision = str(trainer.precision)
    if precision in ("bf16-true", "16-true"):
        raise ConfigError(
            f"trainer.precision {precision} with FSDP2 would keep the master weights and AdamW state in "
            f"{precision.split('-')[0]} as well; use {precision.replace('true', 'mixed')} (FSDP2 computes and "
            "gathers parameters in that dtype, keeps fp32 master weights and reduces gradients in fp32)")
    param_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    mesh = getattr(strategy, "fsdp_mesh", None) or strategy.device_mesh["data_parallel"]
    return parallel.build_sharded(config, mesh, strategy.root_device, param_dtype,
                                  getattr(strategy, "gather_once_per_step", True), switches, bos_id)
