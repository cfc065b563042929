"""Switches applied to the model from outside, in torchtitan's order:
float8 linears -> activation checkpointing -> torch.compile -> FSDP2 (each block, then the root).

No Lightning here: the Lightning strategy that drives FSDP2 is tinytrain.train.strategy."""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Union

import torch
from torch import nn

from tinytrain.errors import ConfigError, UnsupportedError
from tinytrain.model.llama import Llama, with_tied_head

log = logging.getLogger(__name__)


@dataclass
class Switches:
    """The speed switches of a recipe (model.attention, model.compile, ...), in one typed object
    from the recipe to the model. None changes the math beyond rounding, except float8."""

    attention: str = "auto"
    """"auto" (flash-attn when installed on CUDA, else PyTorch SDPA), "sdpa" (PyTorch chooses the
    kernel), "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math" (that kernel only), "flash-attn",
    "flex" (document masking through FlexAttention, as auto and sdpa do on CUDA without flash-attn)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward, to save memory."""
    compile: Union[bool, Literal["auto"]] = False
    """torch.compile each transformer block; "auto": where a one-line function compiles and runs here
    (see ``compile_works``)."""
    compile_loss: Union[bool, Literal["auto"]] = False
    """torch.compile the output head and cross-entropy; "auto" as for compile."""
    loss_chunk_size: int = 0
    """> 0 computes the loss this many tokens at a time, never holding fp32 logits for the whole micro-batch."""
    float8: bool = False
    """Experimental: float8 matmuls in the blocks' linear layers (torchao; compute capability 8.9+)."""
    document_masking: bool = False
    """Tokens attend only within their own document (documents start with BOS in the shards)."""
    document_positions: bool = False
    """With document_masking, RoPE positions restart at each document (Llama 3 does not restart)."""

    def __post_init__(self) -> None:
        for name in ("compile", "compile_loss"):
            if getattr(self, name) not in (True, False, "auto"):
                raise ConfigError(f"model.{name} must be true, false or auto, got {getattr(self, name)!r}")
        if self.loss_chunk_size < 0:
            raise ConfigError(f"model.loss_chunk_size must be >= 0, got {self.loss_chunk_size}")
        if self.document_positions and not self.document_masking:
            raise ConfigError("model.document_positions restarts positions per document: it needs "
                              "model.document_masking: true")


def apply_activation_checkpointing(model: Llama) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: Llama) -> None:
    """torch.compile each transformer block (one graph, reused by all 22) for the training step.
    Everything else (validation, evaluation, decoding with a KV cache) runs the same blocks eager:
    each mode, shape and cache state would add graphs, and under ``fullgraph=True`` the 9th graph
    of a frame is an error (torch's recompile limit), mid-run. A block with experts may break its
    graph where the experts' slices are sized on the host (model/moe.py), so it compiles without
    fullgraph."""
    from tinytrain.model.moe import MoE

    model.compiled_layers = tuple(torch.compile(block, fullgraph=not isinstance(block.mlp, MoE))
                                  for block in model.layers)


def apply_compile_loss(model: Llama) -> None:
    """torch.compile the output head and cross-entropy (``Llama.logits_loss``), for the training step."""
    model.compiled_logits_loss = torch.compile(model.logits_loss, fullgraph=True)


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
        raise UnsupportedError(f"model.float8 needs a GPU of compute capability 8.9 or newer (Hopper, Ada); "
                           f"{torch.cuda.get_device_name(device)} is {torch.cuda.get_device_capability(device)}")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise UnsupportedError("model.float8 needs the torchao package: pip install 'tinytrain[float8]'") from e
    convert_to_float8_training(model, module_filter_fn=_float8_eligible)
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    log.info("float8 matmuls in %d linear layers (experimental)", converted)
    return converted


def apply_fsdp(model: Llama, mesh, param_dtype: Optional[torch.dtype] = None, gather_once_per_step: bool = True) -> None:
    """Shard the model with FSDP2 over ``mesh`` (1-D: fully sharded; 2-D (replicate, shard):
    hybrid). One group for the embedding, one per block, one for the final norm and the output
    head (torchtitan's grouping), then the root, so each group's all-gather overlaps the compute
    of the one before. With ``param_dtype``, parameters are gathered and computed in that dtype
    and gradients reduced in fp32.

    Groups needed again as soon as backward starts (the last block, the norm and head) stay
    gathered after forward. ``gather_once_per_step`` keeps every group gathered across the
    micro-batches of a step when there are several (see ``gathered_for_step``)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    defaults = []  # (FSDP module, reshard_after_forward) to restore after a gathered step

    def shard(module, reshard: bool):
        out = fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        defaults.extend((m, reshard) for m in (out if isinstance(out, list) else [out]))

    # Tied weights live in one group: the embedding's weight is the head's.
    separate_ends = not model.config.tie_word_embeddings
    if separate_ends:
        shard(model.embed_tokens, True)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        shard(block, i < n - 1)
    if separate_ends:
        # One group, unsharded by the norm's forward; the chunked loss reads lm_head.weight directly.
        shard([model.norm, model.lm_head], False)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.fsdp_reshard_defaults = defaults
    model.fsdp_gather_once_per_step = gather_once_per_step


def is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


@torch.no_grad()
def load_full_weights(model: Llama, weights: dict[str, torch.Tensor]) -> None:
    """A full set of weights into ``model``; a sharded one keeps each rank's shard of them."""
    if not is_fsdp(model):
        model.load_weights(weights)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, with_tied_head(weights, model.config),
                         options=StateDictOptions(full_state_dict=True, strict=True))


@contextlib.contextmanager
def gathered_for_step(model: nn.Module, micro_batches: int) -> Iterator[None]:
    """Within this block, with several micro-batches under FSDP2, each group is all-gathered once
    (by the first micro-batch's forward) and resharded after the last micro-batch's backward,
    instead of being gathered for every forward and every backward. Costs memory: the whole model,
    unsharded in the compute dtype, for the duration of the step."""
    active = micro_batches > 1 and is_fsdp(model) and getattr(model, "fsdp_gather_once_per_step", False)
    if active:
        model.set_reshard_after_forward(False)
        model.set_reshard_after_backward(False)
    model.fsdp_gathered_step = active
    try:
        yield
    finally:
        if active:
            for module, reshard in model.fsdp_reshard_defaults:
                module.set_reshard_after_forward(reshard, recurse=False)
            model.set_reshard_after_backward(True)
            model.fsdp_gathered_step = False


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce gradients (and, in a gathered step, reshard) only after the last micro-batch of an
    accumulation: FSDP2 otherwise reduce-scatters after every backward."""
    if is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
        if getattr(model, "fsdp_gathered_step", False):
            model.set_reshard_after_backward(enabled)


def prepare(model: Llama, switches: Switches = Switches(), device: Optional[torch.device] = None,
            bos_id: int = 1) -> None:
    """Apply the recipe's switches to an unsharded model, in the order they compose (``bos_id``
    starts every document, for document masking)."""
    model.set_attention_backend(switches.attention)
    model.loss_chunk_size = switches.loss_chunk_size
    model.document_boundary = bos_id if switches.document_masking else None
    model.document_positions = switches.document_positions
    if switches.float8:
        apply_float8(model, device)
    if switches.activation_checkpointing:
        apply_activation_checkpointing(model)
    works = False
    if switches.compile == "auto" or switches.compile_loss == "auto":
        works, why = compile_works(torch.device(device).type if device is not None else "cpu")
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            log.info("model.compile / compile_loss auto: %s (%s)", "on" if works else "off", why)
    if switches.compile is True or (switches.compile == "auto" and works):
        apply_compile(model)
    if switches.compile_loss is True or (switches.compile_loss == "auto" and works):
        apply_compile_loss(model)


@functools.lru_cache(maxsize=None)
def compile_works(device_type: str) -> tuple[bool, str]:
    """Whether torch.compile works on ``device_type`` in this process, and why: found by compiling and
    running a one-line function (a second or two, once per process). On a CPU, Inductor needs a C++
    compiler and Python's headers, which a laptop may lack; on CUDA, Triton. Apple MPS is not tried."""
    if device_type not in ("cpu", "cuda"):
        return False, f"{device_type}: not measured"
    try:
        probe = torch.compile(lambda x: x * 2.0 + 1.0, fullgraph=True)
        x = torch.arange(8.0, device=device_type)
        if not torch.equal(probe(x), x * 2.0 + 1.0):
            return False, "a compiled probe gave wrong values"
    except Exception as e:  # whatever the toolchain raises: no compiler, no headers, no Triton
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return False, f"torch.compile failed here: {type(e).__name__}: {first}"
    return True, f"torch.compile works on {device_type} here"


def build_sharded(config, mesh, device: torch.device, param_dtype: Optional[torch.dtype] = None,
                  gather_once_per_step: bool = True, switches: Switches = Switches(), bos_id: int = 1) -> Llama:
    """The model as FSDP2 training holds it: built on the meta device, switched (see ``prepare``),
    sharded over ``mesh``, then materialised on ``device`` with TinyLlama's initialisation (each
    rank initialises its own shards)."""
    with torch.device("meta"):
        model = Llama(config)
    prepare(model, switches, device, bos_id)
    apply_fsdp(model, mesh, param_dtype, gather_once_per_step)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(seed=init_seed())
    return model


def init_one_process_group(device: torch.device) -> bool:
    """A process group of this process alone (NCCL on CUDA, else gloo), so FSDP2 runs outside a
    launcher as it does under the Lightning strategy; False if one exists already."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    return True


def bf16_is_fast(device_type: str) -> tuple[bool, str]:
    """Whether ``device_type`` ("cuda", "cpu", ...) multiplies bf16 faster than fp32 here, and why: a
    CUDA GPU with bf16, a CPU with AMX tiles (about twice its fp32 speed on the tiny recipe). CPUs
    without AMX emulate it, slower than fp32; other devices are unmeasured."""
    if device_type == "cuda":
        return (True, "a CUDA GPU with bf16") if torch.cuda.is_bf16_supported() else (False, "a CUDA GPU without bf16")
    if device_type == "cpu":
        return (True, "a CPU with AMX bf16 tiles") if torch.cpu._is_amx_tile_supported() else \
            (False, "a CPU without AMX, where bf16 is slower than fp32")
    return False, f"{device_type}, unmeasured"


def build(config, switches: Switches = Switches(), device: Optional[torch.device] = None, bos_id: int = 1) -> Llama:
    """The model on one device, switched (see ``prepare``), with the weights ``build_sharded``
    gives at any world size."""
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device=device or "cpu")
    with torch.no_grad():
        model.init_weights(seed=init_seed())
    prepare(model, switches, device, bos_id)
    return model


def init_seed() -> int:
    """The base seed of a training run's initial weights: torch's initial seed, which the run's
    seed (seed_everything) sets alike in every process, whatever has drawn numbers since."""
    return torch.initial_seed()
